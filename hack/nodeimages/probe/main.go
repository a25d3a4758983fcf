// Command probe checks, from inside a pod, what the real-node tests assert:
//
//	probe hello                 print "hello from <hostname> uid=<uid>" and exit 0
//	probe write-root            try to create /probe-write; exit 0 if it worked, 3 if refused
//	probe apiserver             GET https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$POD_NAMESPACE/pods
//	                            with the service-account token and CA; prints the HTTP status and the item count
//	probe http URL              GET URL (plain HTTP), print the status; exit 0 on 2xx
//	probe dns NAME...           resolve each NAME through the pod's /etc/resolv.conf (search
//	                            domains included), retrying for up to 30 s; print "NAME -> ADDRS"
//
// Any other failure exits 1 with the error on stderr.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: probe hello|write-root|apiserver|http URL|dns NAME...")
	}
	switch os.Args[1] {
	case "hello":
		host, _ := os.Hostname()
		fmt.Printf("hello from %s uid=%d\n", host, os.Getuid())
	case "write-root":
		err := os.WriteFile("/probe-write", []byte("x"), 0o644)
		if err != nil {
			fmt.Printf("write refused: %v\n", err)
			os.Exit(3)
		}
		fmt.Println("write succeeded")
	case "apiserver":
		apiserver()
	case "http":
		if len(os.Args) < 3 {
			fail("usage: probe http URL")
		}
		client := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil}}
		resp, err := client.Get(os.Args[2])
		if err != nil {
			fail("GET %s: %v", os.Args[2], err)
		}
		resp.Body.Close()
		fmt.Printf("GET %s: %d\n", os.Args[2], resp.StatusCode)
		if resp.StatusCode/100 != 2 {
			os.Exit(1)
		}
	case "dns":
		if len(os.Args) < 3 {
			fail("usage: probe dns NAME...")
		}
		for _, name := range os.Args[2:] {
			resolve(name)
		}
	default:
		fail("unknown command %q", os.Args[1])
	}
}

func apiserver() {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		fail("KUBERNETES_SERVICE_HOST/PORT not set")
	}
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		fail("read token: %v", err)
	}
	caPEM, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		fail("read ca.crt: %v", err)
	}
	ns, err := os.ReadFile(saDir + "/namespace")
	if err != nil {
		fail("read namespace: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		fail("no certificate in ca.crt")
	}
	client := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: pool}}}
	url := fmt.Sprintf("https://%s:%s/api/v1/namespaces/%s/pods", host, port, ns)
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+string(token))
	resp, err := client.Do(req)
	if err != nil {
		fail("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var list struct {
		Items []json.RawMessage `json:"items"`
	}
	_ = json.Unmarshal(body, &list)
	fmt.Printf("GET %s: %d items=%d\n", url, resp.StatusCode, len(list.Items))
	if resp.StatusCode != 200 {
		fmt.Println(string(body))
		os.Exit(1)
	}
}

// resolve looks NAME up with Go's own resolver (it reads /etc/resolv.conf: the kubelet's
// nameserver, search list and ndots); a new headless Service's records can take a moment.
func resolve(name string) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		addrs, err := net.DefaultResolver.LookupHost(ctx, name)
		cancel()
		if err == nil {
			fmt.Printf("%s -> %s\n", name, strings.Join(addrs, ","))
			return
		}
		if time.Now().After(deadline) {
			fail("resolve %s: %v", name, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
