// ptbench: the benchmark's server and client, one static Go binary (stdlib only, CGO_ENABLED=0,
// so the pure-Go resolver is used: no libc, no resolver cache, the same code in both arms).
//
//	ptbench serve [-addr :8080]
//	ptbench client -name backend -port 8080 [-bytes N] [-repeat R] [-keepalive K] [-newconn C] [-dns D] ...
//	ptbench load -url http://web/ping [-H 'name: value'] [-c C] [-n N | -duration D] [-newconn] [-expect NAME]
//	ptbench files -big FILE -small DIR [-passes P]
//	ptbench soak -addr backend:8080 [-c 1000] [-hold 5s] [-wait 0s]
//
// The server answers GET /zeros?bytes=N (N zero bytes), GET /ping ("pong\n") and POST /sink
// (reads the body, answers with its length); with -name it tags every answer with the header
// X-Served-By: NAME and prints {"served":N} once a second while its request count changes.
// The load mode (incoming benchmark) sends GET -url from C workers, each over its own kept-alive
// connection (or a new one per request with -newconn), N requests in all or for -duration, and
// prints one result line with p50/p99 latency, requests per second and who served the answers. The client runs its phases in order and prints one
// JSON object per line on stdout: {"event":"start","phase":P} before a phase and
// {"event":"result","phase":P,...} after it, so the caller can tell which phase is running.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var zeros = make([]byte, 256*1024)

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	addr := fs.String("addr", ":8080", "listen address")
	name := fs.String("name", "", "answer with the header X-Served-By: NAME and report the request count")
	fs.Parse(args)
	var served atomic.Int64
	mux := http.NewServeMux()
	var handler http.Handler = mux
	if *name != "" {
		handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			served.Add(1)
			w.Header().Set("X-Served-By", *name)
			mux.ServeHTTP(w, r)
		})
		go func() {
			last := int64(0)
			for range time.Tick(time.Second) {
				if n := served.Load(); n != last {
					last = n
					emit(map[string]any{"served": n})
				}
			}
		}()
	}
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
	if err := http.ListenAndServe(*addr, handler); err != nil {
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

type headerFlags []string

func (h *headerFlags) String() string     { return strings.Join(*h, ", ") }
func (h *headerFlags) Set(v string) error { *h = append(*h, v); return nil }

func percentile(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return -1
	}
	i := int(float64(len(sorted))*p/100+0.999999) - 1 // nearest rank
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

// load: GET -url from -c workers; latency of every request after the warm-up, requests per second
// over the measured part, and the X-Served-By of the answers (to prove where the requests went).
func load(args []string) {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	url := fs.String("url", "http://web/ping", "URL to GET")
	var headers headerFlags
	fs.Var(&headers, "H", "request header 'name: value' (repeatable)")
	conc := fs.Int("c", 1, "workers, each with its own connection")
	n := fs.Int("n", 0, "requests in all (0: until -duration)")
	dur := fs.Duration("duration", 10*time.Second, "measured time when -n is 0; upper bound otherwise")
	warm := fs.Int("warm", 20, "warm-up requests per worker, not counted")
	newconn := fs.Bool("newconn", false, "a new TCP connection per request")
	expect := fs.String("expect", "", "fail unless every answer has X-Served-By: EXPECT")
	phase := fs.String("phase", "load", "phase name in the output")
	fs.Parse(args)

	req, err := http.NewRequest("GET", *url, nil)
	if err != nil {
		fail(*phase, err)
	}
	for _, h := range headers {
		k, v, ok := strings.Cut(h, ":")
		if !ok {
			fail(*phase, fmt.Errorf("header %q: want 'name: value'", h))
		}
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	emit(map[string]any{"event": "start", "phase": *phase})
	var (
		next     atomic.Int64 // requests handed out (bounded by -n)
		mu       sync.Mutex
		samples  []int64
		servedBy = map[string]int{}
		firstErr error
		wg       sync.WaitGroup
	)
	start := make(chan struct{})
	var t0 time.Time
	var deadline time.Time
	ready := sync.WaitGroup{}
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			tr := &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true, DisableKeepAlives: *newconn}
			c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
			buf := make([]byte, 64*1024)
			local := make([]int64, 0, 4096)
			by := map[string]int{}
			do := func() (string, error) {
				resp, err := c.Do(req.Clone(context.Background()))
				if err != nil {
					return "", err
				}
				_, err = io.CopyBuffer(io.Discard, resp.Body, buf)
				resp.Body.Close()
				if err == nil && resp.StatusCode != 200 {
					err = fmt.Errorf("HTTP %d", resp.StatusCode)
				}
				return resp.Header.Get("X-Served-By"), err
			}
			var werr error
			for i := 0; i < *warm; i++ {
				if _, werr = do(); werr != nil {
					break
				}
			}
			ready.Done()
			<-start
			for werr == nil && time.Now().Before(deadline) {
				if *n > 0 && next.Add(1) > int64(*n) {
					break
				}
				t := time.Now()
				who, err := do()
				if err != nil {
					werr = err
					break
				}
				local = append(local, time.Since(t).Microseconds())
				by[who]++
			}
			mu.Lock()
			samples = append(samples, local...)
			for k, v := range by {
				servedBy[k] += v
			}
			if werr != nil && firstErr == nil {
				firstErr = werr
			}
			mu.Unlock()
		}()
	}
	ready.Wait()
	t0 = time.Now()
	deadline = t0.Add(*dur)
	close(start)
	wg.Wait()
	secs := time.Since(t0).Seconds()
	if firstErr != nil {
		fail(*phase, firstErr)
	}
	if *expect != "" {
		for who, k := range servedBy {
			if who != *expect {
				fail(*phase, fmt.Errorf("%d of %d answers came from %q, not %q", k, len(samples), who, *expect))
			}
		}
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	emit(map[string]any{"event": "result", "phase": *phase, "requests": len(samples), "seconds": secs,
		"rps": float64(len(samples)) / secs, "p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99),
		"served_by": servedBy, "concurrency": *conc})
}

// files: the files benchmark's reader. Sequential read of -big (one pass, 1 MiB reads), then
// open+read+close of every file in -small: the first pass cold (never opened before), the later
// ones warm. One result line: MB/s and the per-file latency p50/p99 of each kind.
func files(args []string) {
	fs := flag.NewFlagSet("files", flag.ExitOnError)
	big := fs.String("big", "", "a large file to read sequentially")
	small := fs.String("small", "", "a directory of small files")
	passes := fs.Int("passes", 3, "passes over the small files (the first is cold)")
	fs.Parse(args)
	buf := make([]byte, 1<<20)
	t0 := time.Now()
	f, err := os.Open(*big)
	if err != nil {
		fail("files", err)
	}
	var total int64
	for {
		n, err := f.Read(buf)
		total += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("files", err)
		}
	}
	f.Close()
	secs := time.Since(t0).Seconds()
	entries, err := os.ReadDir(*small)
	if err != nil {
		fail("files", err)
	}
	var cold, warm []int64
	for pass := 0; pass < *passes; pass++ {
		for _, e := range entries {
			t := time.Now()
			b, err := os.ReadFile(*small + "/" + e.Name())
			if err != nil || len(b) == 0 {
				fail("files", fmt.Errorf("%s: %v (%d bytes)", e.Name(), err, len(b)))
			}
			if pass == 0 {
				cold = append(cold, micros(time.Since(t)))
			} else {
				warm = append(warm, micros(time.Since(t)))
			}
		}
	}
	sort.Slice(cold, func(i, j int) bool { return cold[i] < cold[j] })
	sort.Slice(warm, func(i, j int) bool { return warm[i] < warm[j] })
	emit(map[string]any{"event": "result", "phase": "files", "bytes": total, "mb_s": float64(total) / 1e6 / secs,
		"small_files": len(entries), "cold_p50_us": percentile(cold, 50), "cold_p99_us": percentile(cold, 99),
		"warm_p50_us": percentile(warm, 50), "warm_p99_us": percentile(warm, 99)})
}

// soak: -c connections opened at once, each sends GET /ping, all are held open for -hold, then
// each sends GET /ping again on the same connection; one result line: how many connections
// answered both times, how many failed (and the first error), and how long opening all took.
func soak(args []string) {
	fs := flag.NewFlagSet("soak", flag.ExitOnError)
	addr := fs.String("addr", "backend:8080", "host:port of the server")
	conc := fs.Int("c", 1000, "concurrent connections")
	hold := fs.Duration("hold", 5*time.Second, "how long every connection is held open")
	wait := fs.Duration("wait", 0, "pause before opening them (lets the caller measure the idle state)")
	fs.Parse(args)
	time.Sleep(*wait)
	ping := func(c net.Conn, r *bufioReader) error {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write([]byte("GET /ping HTTP/1.1\r\nHost: soak\r\n\r\n")); err != nil {
			return err
		}
		resp, err := http.ReadResponse(r.Reader, nil)
		if err != nil {
			return err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(body) != "pong\n" {
			return fmt.Errorf("bad answer %q: %v", body, err)
		}
		return nil
	}
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	conns := make([]net.Conn, *conc)
	readers := make([]*bufioReader, *conc)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < *conc; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", *addr, 30*time.Second)
			if err == nil {
				readers[i] = newBufioReader(c)
				err = ping(c, readers[i])
			}
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				if c != nil {
					c.Close()
				}
				return
			}
			conns[i] = c
		}(i)
	}
	wg.Wait()
	opened := time.Since(start)
	emit(map[string]any{"event": "held", "open": *conc - int(failed.Load())})
	time.Sleep(*hold)
	for i, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			defer c.Close()
			if err := ping(c, readers[i]); err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			ok.Add(1)
		}(i, c)
	}
	wg.Wait()
	e, _ := firstErr.Load().(string)
	emit(map[string]any{"event": "result", "phase": "soak", "connections": *conc, "ok": ok.Load(),
		"failed": failed.Load(), "first_error": e, "open_seconds": opened.Seconds()})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ptbench serve|client|load|files|soak [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "client":
		client(os.Args[2:])
	case "load":
		load(os.Args[2:])
	case "files":
		files(os.Args[2:])
	case "soak":
		soak(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: ptbench serve|client|load|files|soak [flags]")
		os.Exit(2)
	}
}

type bufioReader struct{ *bufio.Reader }

func newBufioReader(c net.Conn) *bufioReader { return &bufioReader{bufio.NewReader(c)} }

