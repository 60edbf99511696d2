// pause: the sandbox ("infra") container of every pod. It holds the pod's namespaces open and
// does nothing else: sleep until SIGTERM/SIGINT, and reap zombies, since it is PID 1 when a pod
// shares its process namespace. Built static (CGO_ENABLED=0) and put in a FROM scratch image,
// because no registry is reachable to pull registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
