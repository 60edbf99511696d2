// udpsend: send one UDP datagram and print the reply. A static Go binary (no libc, no hooks
// possible), used by the tests as the "unchanged app" that needs outgoing UDP.
//
//	udpsend HOST:PORT MESSAGE [TIMEOUT_SECONDS]
package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: udpsend HOST:PORT MESSAGE [TIMEOUT_SECONDS]")
		os.Exit(2)
	}
	timeout := 5 * time.Second
	if len(os.Args) > 3 {
		if s, err := strconv.Atoi(os.Args[3]); err == nil {
			timeout = time.Duration(s) * time.Second
		}
	}
	conn, err := net.Dial("udp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "udpsend:", err)
		os.Exit(1)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(os.Args[2])); err != nil {
		fmt.Fprintln(os.Stderr, "udpsend:", err)
		os.Exit(1)
	}
	conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 65535)
	n, err := conn.Read(buf)
	if err != nil {
		fmt.Fprintln(os.Stderr, "udpsend:", err)
		os.Exit(1)
	}
	fmt.Println(string(buf[:n]))
}
