// h2probe: an HTTP/1.1 + h2c + gRPC server and clients for the incoming-traffic tests. A static
// Go binary (no libc) in podtwin-test/busybox, so the "unchanged app" of a test can speak HTTP/2
// and gRPC with real, well-kept implementations (golang.org/x/net/http2, google.golang.org/grpc).
//
//	h2probe serve [--port 80] [--name NAME]
//	    One port for HTTP/1.1, HTTP/2 with prior knowledge (h2c) and gRPC (content-type
//	    application/grpc over h2c; the built-in grpc.health.v1.Health service). Every answer
//	    names its server: the HTTP header and body "served-by: NAME", the gRPC response header
//	    metadata "served-by". Each request is logged on stderr.
//	h2probe get [--h2c] URL [-H 'k: v']... [--count N] [--alternate-header] [--parallel]
//	        [--body-size N]
//	    N requests; with --h2c all of them on ONE HTTP/2 connection (prior knowledge). Prints
//	    "STATUS served-by=NAME bytes=LEN" per response, in request order, then
//	    "connections=C" (the TCP connections dialed).
//	h2probe grpc ADDR [--md k=v]... [--count N] [--alternate-header] [--parallel]
//	    N health Check calls on ONE gRPC connection. Prints "STATUS served-by=NAME" per call
//	    (STATUS is SERVING, or the gRPC error code), then "connections=C".
//
// --alternate-header: the -H headers (--md metadata) go on requests 1, 3, 5... only (counting
// from 1), so one connection carries streams with and streams without them.
// --parallel: the requests are in flight at the same time (interleaved streams).
// --body-size N: each request is a POST with an N byte body (the server reports what it read
// in its "received=" header); a "size=N" query parameter asks the server for an N byte body.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ", ") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func usage() {
	fmt.Fprintln(os.Stderr, "usage: h2probe serve [--port 80] [--name NAME]\n"+
		"       h2probe get [--h2c] URL [-H 'k: v']... [--count N] [--alternate-header] [--parallel] [--body-size N]\n"+
		"       h2probe grpc ADDR [--md k=v]... [--count N] [--alternate-header] [--parallel]")
	os.Exit(2)
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("h2probe: ")
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "get":
		os.Exit(get(os.Args[2:]))
	case "grpc":
		os.Exit(grpcCheck(os.Args[2:]))
	default:
		usage()
	}
}

// parse lets flags come before or after the positional arguments ("get URL -H ...").
func parse(fs *flag.FlagSet, args []string) []string {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			os.Exit(2)
		}
		args = fs.Args()
		if len(args) == 0 {
			return positional
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
}

// --- serve -------------------------------------------------------------------------------------

type health struct {
	healthpb.UnimplementedHealthServer
	name string
}

func (h *health) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	log.Printf("%s: grpc Check user=%q", h.name, strings.Join(md.Get("x-podtwin-user"), ","))
	if err := grpc.SetHeader(ctx, metadata.Pairs("served-by", h.name)); err != nil {
		return nil, err
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	port := fs.Int("port", 80, "TCP port to listen on (all addresses)")
	name := fs.String("name", "h2probe", "the name every answer carries")
	parse(fs, args)

	grpcServer := grpc.NewServer()
	healthpb.RegisterHealthServer(grpcServer, &health{name: *name})

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			grpcServer.ServeHTTP(w, r)
			return
		}
		received, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			log.Printf("%s: reading the body of %s %s: %v", *name, r.Method, r.URL, err)
		}
		log.Printf("%s: %s %s %s user=%q received=%d", *name, r.Proto, r.Method, r.URL.RequestURI(),
			r.Header.Get("X-Podtwin-User"), received)
		w.Header().Set("served-by", *name)
		w.Header().Set("received", strconv.FormatInt(received, 10))
		if size, err := strconv.Atoi(r.URL.Query().Get("size")); err == nil && size > 0 {
			w.Header().Set("content-length", strconv.Itoa(size))
			w.Write(bytes.Repeat([]byte("x"), size))
			return
		}
		fmt.Fprintf(w, "served-by: %s\nproto: %s\nmethod: %s\npath: %s\nreceived: %d\n",
			*name, r.Proto, r.Method, r.URL.RequestURI(), received)
	})
	srv := &http.Server{
		Addr:              fmt.Sprintf(":%d", *port),
		Handler:           h2c.NewHandler(handler, &http2.Server{}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	log.Printf("%s: listening on %s (HTTP/1.1, h2c, gRPC)", *name, srv.Addr)
	log.Fatal(srv.ListenAndServe())
}

// --- clients -----------------------------------------------------------------------------------

type countingDialer struct{ dials atomic.Int32 }

func (d *countingDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.dials.Add(1)
	var nd net.Dialer
	return nd.DialContext(ctx, network, addr)
}

// run calls do(i) for i in 0..count-1, one after the other or all at once.
func run(count int, parallel bool, do func(i int) string) []string {
	lines := make([]string, count)
	if !parallel {
		for i := range lines {
			lines[i] = do(i)
		}
		return lines
	}
	var wg sync.WaitGroup
	for i := range lines {
		wg.Add(1)
		go func(i int) { defer wg.Done(); lines[i] = do(i) }(i)
	}
	wg.Wait()
	return lines
}

func withHeader(i int, alternate bool) bool { return !alternate || i%2 == 0 }

func get(args []string) int {
	fs := flag.NewFlagSet("get", flag.ContinueOnError)
	useH2c := fs.Bool("h2c", false, "HTTP/2 with prior knowledge, all requests on one connection")
	var headers multi
	fs.Var(&headers, "H", "a request header 'name: value' (repeatable)")
	count := fs.Int("count", 1, "number of requests")
	alternate := fs.Bool("alternate-header", false, "send the -H headers on requests 1, 3, 5... only")
	parallel := fs.Bool("parallel", false, "all requests in flight at once")
	bodySize := fs.Int("body-size", -1, "POST a body of this many bytes")
	timeout := fs.Duration("timeout", 20*time.Second, "for everything")
	pos := parse(fs, args)
	if len(pos) != 1 {
		usage()
	}
	url := pos[0]
	dialer := &countingDialer{}
	var transport http.RoundTripper
	if *useH2c {
		transport = &http2.Transport{
			AllowHTTP: true,
			DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
				return dialer.dial(ctx, network, addr)
			},
		}
	} else {
		transport = &http.Transport{DialContext: dialer.dial}
	}
	client := &http.Client{Transport: transport, Timeout: *timeout}
	failed := atomic.Bool{}
	lines := run(*count, *parallel, func(i int) string {
		method, body := "GET", io.Reader(nil)
		if *bodySize >= 0 {
			method, body = "POST", bytes.NewReader(bytes.Repeat([]byte("y"), *bodySize))
		}
		req, err := http.NewRequest(method, url, body)
		if err != nil {
			log.Fatal(err)
		}
		if withHeader(i, *alternate) {
			for _, h := range headers {
				k, v, ok := strings.Cut(h, ":")
				if !ok {
					log.Fatalf("bad header %q (want 'name: value')", h)
				}
				req.Header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
			}
		}
		resp, err := client.Do(req)
		if err != nil {
			failed.Store(true)
			return fmt.Sprintf("error %v", err)
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		if err != nil {
			failed.Store(true)
			return fmt.Sprintf("error reading the body: %v", err)
		}
		line := fmt.Sprintf("%d served-by=%s bytes=%d", resp.StatusCode, resp.Header.Get("served-by"), n)
		if *bodySize >= 0 {
			line += " received=" + resp.Header.Get("received")
		}
		return line
	})
	for _, line := range lines {
		fmt.Println(line)
	}
	fmt.Printf("connections=%d\n", dialer.dials.Load())
	if failed.Load() {
		return 1
	}
	return 0
}

func grpcCheck(args []string) int {
	fs := flag.NewFlagSet("grpc", flag.ContinueOnError)
	var mds multi
	fs.Var(&mds, "md", "request metadata 'key=value' (repeatable)")
	count := fs.Int("count", 1, "number of calls")
	alternate := fs.Bool("alternate-header", false, "send the --md metadata on calls 1, 3, 5... only")
	parallel := fs.Bool("parallel", false, "all calls in flight at once")
	timeout := fs.Duration("timeout", 20*time.Second, "for everything")
	pos := parse(fs, args)
	if len(pos) != 1 {
		usage()
	}
	var pairs []string
	for _, kv := range mds {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			log.Fatalf("bad metadata %q (want key=value)", kv)
		}
		pairs = append(pairs, k, v)
	}
	dialer := &countingDialer{}
	conn, err := grpc.NewClient("passthrough:///"+pos[0],
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialer.dial(ctx, "tcp", addr)
		}))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client := healthpb.NewHealthClient(conn)
	failed := atomic.Bool{}
	lines := run(*count, *parallel, func(i int) string {
		callCtx := ctx
		if withHeader(i, *alternate) && len(pairs) > 0 {
			callCtx = metadata.AppendToOutgoingContext(ctx, pairs...)
		}
		var header metadata.MD
		resp, err := client.Check(callCtx, &healthpb.HealthCheckRequest{}, grpc.Header(&header),
			grpc.WaitForReady(true))
		servedBy := strings.Join(header.Get("served-by"), ",")
		if err != nil {
			failed.Store(true)
			return fmt.Sprintf("%s served-by=%s (%s)", status.Code(err), servedBy,
				status.Convert(err).Message())
		}
		return fmt.Sprintf("%s served-by=%s", resp.GetStatus(), servedBy)
	})
	for _, line := range lines {
		fmt.Println(line)
	}
	fmt.Printf("connections=%d\n", dialer.dials.Load())
	if failed.Load() {
		return 1
	}
	return 0
}
