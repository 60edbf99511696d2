// ptbench: the benchmark's server and client, one static Go binary (stdlib only, CGO_ENABLED=0,
// so the pure-Go resolver is used: no libc, no resolver cache, the same code in both arms).
//
//	ptbench serve [-addr :8080]
//	ptbench client -name backend -port 8080 [-bytes N] [-repeat R] [-keepalive K] [-newconn C] [-dns D] ...
//
// The server answers GET /zeros?bytes=N (N zero bytes), GET /ping ("pong\n") and POST /sink
// (reads the body, answers with its length). The client runs its phases in order and prints one
// JSON object per line on stdout: {"event":"start","phase":P} before a phase and
// {"event":"result","phase":P,...} after it, so the caller can tell which phase is running.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

var zeros = make([]byte, 256*1024)

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	addr := fs.String("addr", ":8080", "listen address")
	fs.Parse(args)
	mux := http.NewServeMux()
	mux.HandleFunc("/ping", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "5")
		w.Write([]byte("pong\n"))
	})
	mux.HandleFunc("/zeros", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bytes=N", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		for n > 0 {
			chunk := int64(len(zeros))
			if n < chunk {
				chunk = n
			}
			if _, err := w.Write(zeros[:chunk]); err != nil {
				return
			}
			n -= chunk
		}
	})
	mux.HandleFunc("/sink", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.CopyBuffer(io.Discard, r.Body, make([]byte, 256*1024))
		fmt.Fprintf(w, "%d\n", n)
	})
	fmt.Println("PTBENCH_SERVING", *addr)
	if err := http.ListenAndServe(*addr, mux); err != nil {
		fmt.Fprintln(os.Stderr, "ptbench serve:", err)
		os.Exit(1)
	}
}

type zeroReader struct{ left int64 }

func (z *zeroReader) Read(p []byte) (int, error) {
	if z.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > z.left {
		p = p[:z.left]
	}
	for i := range p {
		p[i] = 0
	}
	z.left -= int64(len(p))
	return len(p), nil
}

func emit(v map[string]any) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

func fail(phase string, err error) {
	emit(map[string]any{"event": "error", "phase": phase, "error": err.Error()})
	os.Exit(1)
}

func micros(d time.Duration) int64 { return d.Microseconds() }

// timed runs fn up to n times or until maxDur has passed; the first `warm` runs are not recorded.
func timed(n, warm int, maxDur time.Duration, fn func() error) ([]int64, error) {
	samples := make([]int64, 0, n)
	deadline := time.Now().Add(maxDur)
	for i := 0; i < n+warm && time.Now().Before(deadline); i++ {
		t0 := time.Now()
		if err := fn(); err != nil {
			return samples, err
		}
		if i >= warm {
			samples = append(samples, micros(time.Since(t0)))
		}
	}
	return samples, nil
}

func client(args []string) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	name := fs.String("name", "backend", "server host name (resolved once, through the resolver under test)")
	port := fs.Int("port", 8080, "server port")
	nbytes := fs.Int64("bytes", 100<<20, "bytes per download/upload")
	repeat := fs.Int("repeat", 3, "downloads (and uploads) to time")
	upload := fs.Bool("upload", true, "also time uploads")
	keepalive := fs.Int("keepalive", 2000, "small requests over one kept-alive connection")
	newconn := fs.Int("newconn", 500, "small requests, a new TCP connection each")
	dnsN := fs.Int("dns", 500, "DNS lookups of -name (A only, pure-Go resolver, no cache)")
	maxPhase := fs.Duration("max-phase", 60*time.Second, "upper bound on each phase")
	settle := fs.Duration("settle", 0, "pause after the first lookup, before the phases (lets the caller find processes to sample)")
	fs.Parse(args)

	ctx := context.Background()
	resolver := &net.Resolver{PreferGo: true}
	ips, err := resolver.LookupIP(ctx, "ip4", *name)
	if err != nil || len(ips) == 0 {
		fail("resolve", fmt.Errorf("lookup %s: %v", *name, err))
	}
	base := "http://" + net.JoinHostPort(ips[0].String(), strconv.Itoa(*port))
	emit(map[string]any{"event": "resolved", "name": *name, "ip": ips[0].String()})
	time.Sleep(*settle)

	keep := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DisableCompression: true}}
	buf := make([]byte, 256*1024)
	get := func(c *http.Client, url string) (int64, error) {
		resp, err := c.Get(url)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		n, err := io.CopyBuffer(io.Discard, resp.Body, buf)
		if err == nil && resp.StatusCode != 200 {
			err = fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return n, err
	}

	// 1. bulk download (and upload): seconds per transfer of -bytes
	phase := func(p string) { emit(map[string]any{"event": "start", "phase": p}) }
	if *repeat > 0 {
		phase("download")
		secs := []float64{}
		deadline := time.Now().Add(*maxPhase)
		for i := 0; i < *repeat && time.Now().Before(deadline); i++ {
			t0 := time.Now()
			n, err := get(fresh, fmt.Sprintf("%s/zeros?bytes=%d", base, *nbytes))
			if err != nil {
				fail("download", err)
			}
			if n != *nbytes {
				fail("download", fmt.Errorf("got %d of %d bytes", n, *nbytes))
			}
			secs = append(secs, time.Since(t0).Seconds())
		}
		emit(map[string]any{"event": "result", "phase": "download", "bytes": *nbytes, "seconds": secs})
		if *upload {
			phase("upload")
			secs = []float64{}
			deadline = time.Now().Add(*maxPhase)
			for i := 0; i < *repeat && time.Now().Before(deadline); i++ {
				t0 := time.Now()
				req, _ := http.NewRequest("POST", base+"/sink", &zeroReader{*nbytes})
				req.ContentLength = *nbytes
				resp, err := fresh.Do(req)
				if err != nil {
					fail("upload", err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(body) != fmt.Sprintf("%d\n", *nbytes) {
					fail("upload", fmt.Errorf("server got %q bytes", body))
				}
				secs = append(secs, time.Since(t0).Seconds())
			}
			emit(map[string]any{"event": "result", "phase": "upload", "bytes": *nbytes, "seconds": secs})
		}
	}

	// 2. small requests: one kept-alive connection, then a new connection per request
	ping := func(c *http.Client) func() error {
		return func() error {
			n, err := get(c, base+"/ping")
			if err == nil && n != 5 {
				err = fmt.Errorf("short answer (%d bytes)", n)
			}
			return err
		}
	}
	if *keepalive > 0 {
		phase("keepalive")
		s, err := timed(*keepalive, 20, *maxPhase, ping(keep))
		if err != nil {
			fail("keepalive", err)
		}
		emit(map[string]any{"event": "result", "phase": "keepalive", "us": s})
	}
	if *newconn > 0 {
		phase("newconn")
		s, err := timed(*newconn, 10, *maxPhase, ping(fresh))
		if err != nil {
			fail("newconn", err)
		}
		emit(map[string]any{"event": "result", "phase": "newconn", "us": s})
	}

	// 3. DNS: the same A lookup, again and again (the pure-Go resolver does not cache)
	if *dnsN > 0 {
		phase("dns")
		s, err := timed(*dnsN, 10, *maxPhase, func() error {
			ips, err := resolver.LookupIP(ctx, "ip4", *name)
			if err == nil && len(ips) == 0 {
				err = fmt.Errorf("no address")
			}
			return err
		})
		if err != nil {
			fail("dns", err)
		}
		emit(map[string]any{"event": "result", "phase": "dns", "us": s})
	}
	emit(map[string]any{"event": "done"})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ptbench serve|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: ptbench serve|client [flags]")
		os.Exit(2)
	}
}
