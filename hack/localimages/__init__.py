"""Container images of the project built on this machine (``make images``).

``build.build_images()`` returns ``{"operator": ref, "trainer": ref}``; ``bases`` makes the
local stand-ins for the public base images, ``engine`` runs podman the way this machine
kind needs, ``ca`` finds the CA bundle passed as a build secret, ``stamps`` hashes inputs.
"""


def build_images(log=print) -> dict[str, str]:
    """``{"operator": ref, "trainer": ref}``: :func:`localimages.build.build_images` (builds what is out of date)."""
    from localimages.build import build_images as _build_images

    return _build_images(log=log)
