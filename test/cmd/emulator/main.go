// Command emulator runs the local AWS IoT Jobs / MQTT streams / presigned-HTTP emulator with
// an embedded broker, creates OTA jobs from files and prints every job status update as it
// arrives. It lets gateway developers try a device without an AWS account.
//
//	emulator --listen 127.0.0.1:1883 --http 127.0.0.1:8080 --thing gw-01 \
//	    --job-file fw.img --key signer.key.pem
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/gwota/gwota/test/cmd/emulator/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "emulator:", err)
		os.Exit(1)
	}
}
