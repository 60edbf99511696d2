// CoreDNS with only the plugins the test cluster's Corefile uses. Importing coremain with the
// full plugin list (what `go install github.com/coredns/coredns` builds) would pull in every
// cloud SDK; CoreDNS supports exactly this kind of external build: set dnsserver.Directives
// (the plugin order) and blank-import the plugins. There is deliberately no `forward` plugin:
// the cluster must never send a query off this machine.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/template"
)

// Same relative order as CoreDNS's plugin.cfg.
var directives = []string{
	"reload",
	"health",
	"ready",
	"errors",
	"log",
	"loadbalance",
	"cache",
	"hosts",
	"kubernetes",
	"template",
}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
