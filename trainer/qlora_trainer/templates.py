"""Named chat templates (``dataset.chatTemplate``): Jinja strings for ``apply_chat_template``.

``tokenizer`` (the default) uses the model's own template. The named ones are for
base models without one, or to force a layout:

* ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn.
* ``llama2``: ``<s>[INST] <<SYS>>...<</SYS>> {user} [/INST] {assistant} </s>`` per exchange.
* ``alpaca``: ``### Instruction:`` / ``### Response:`` blocks, EOS after each response.

All three render a conversation prefix by prefix (the text of the first ``k`` turns is
a prefix of the text of all of them), which ``encode`` needs to find the assistant
spans that are trained on.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ (bos_token or '') + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + (eos_token or '') }}"
    "{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + message['content'] + (eos_token or '') + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

#: ``dataset.chatTemplate`` value -> Jinja template (``tokenizer`` is not here: the model's own).
NAMED = {"chatml": CHATML, "llama2": LLAMA2, "alpaca": ALPACA}
