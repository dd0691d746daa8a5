// Command step-ca for the mtls-sidecar tests.
//
// Debian ships smallstep's certificates library (github.com/smallstep/certificates, 0.19)
// but no step-ca command. This is our own small entry point: it runs the library's own
// "start" command (commands.AppCommand: flags, then the path of ca.json) as the whole app.
// tests/stepca.py builds it offline in GOPATH mode against /usr/share/gocode and caches the
// binary; see that file for how.
package main

import (
	"fmt"
	"os"

	"github.com/smallstep/certificates/commands"
	"github.com/urfave/cli"
	"go.step.sm/cli-utils/step"

	// Register the software CA service and key manager that a file-based ca.json uses.
	_ "github.com/smallstep/certificates/cas/softcas"
	_ "github.com/smallstep/certificates/kms/softkms"
)

const version = "0.19-debian+mtls-sidecar-tests"

func main() {
	step.Set("Smallstep CA", version, "unknown")
	if err := step.Contexts().Init(); err != nil {
		fmt.Fprintln(os.Stderr, "step-ca: cannot initialise STEPPATH:", err)
		os.Exit(1)
	}

	start := commands.AppCommand
	app := cli.NewApp()
	app.Name = "step-ca"
	app.HelpName = "step-ca"
	app.Usage = "an online certificate authority (smallstep certificates library)"
	app.Version = version
	app.UsageText = start.UsageText
	app.Flags = start.Flags
	app.Action = start.Action
	app.HideHelp = false

	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "step-ca:", err)
		os.Exit(1)
	}
}
