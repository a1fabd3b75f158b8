// Package cli is the emulator command, kept out of main so it can be tested in-process too.
package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

var unsafeID = regexp.MustCompile(`[^a-zA-Z0-9_-]+`)

// Run parses args, starts the emulator, creates the jobs and prints updates until ctx ends.
// Lines on stdout: "broker URL", "http URL", "job ID ...", then one "update ..." per status
// change.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("emulator", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:1883", "embedded broker address")
	external := fs.String("external-broker", "", "use this broker (mqtt://host:port) instead of the embedded one")
	httpAddr := fs.String("http", "127.0.0.1:0", "presigned-URL file server address")
	thing := fs.String("thing", "gw-01", "thing name (the device's MQTT client id)")
	var files multi
	fs.Var(&files, "job-file", "create an OTA job for this file (repeatable)")
	key := fs.String("key", "", "PEM private key that signs the files (EC, RSA or Ed25519)")
	sigAlg := fs.String("sig-alg", "", "sha256-ecdsa, sha256-rsa, sha256-rsa-pss or sha256-ed25519 (default: from the key)")
	protocols := fs.String("protocols", "MQTT,HTTP", "protocols in the job document")
	devicePath := fs.String("device-path", "/opt/fw/gateway.img", "the document's filepath")
	certFile := fs.String("certfile", "signer.crt.pem", "the document's certfile")
	fileType := fs.Int("file-type", 0, "the document's fileType")
	seed := fs.Uint64("seed", 1, "fault-injection seed")
	verbose := fs.Bool("v", false, "log every emulator event to stderr")
	noQuotas := fs.Bool("no-quotas", false, "lift AWS IoT Core's per-connection quotas (512 KiB/s each way, 100 publishes/s, 128 KiB payloads, 50 subscriptions, 8 filters per SUBSCRIBE) for loopback benchmarks")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var keyPEM []byte
	if *key != "" {
		var err error
		if keyPEM, err = os.ReadFile(*key); err != nil {
			return err
		}
	}
	level := hclog.Warn
	if *verbose {
		level = hclog.Debug
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "emulator", Level: level, Output: stderr})

	var outMu sync.Mutex
	printf := func(format string, a ...any) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Fprintf(stdout, format, a...)
	}
	e, err := emulator.Start(ctx, emulator.Options{
		Listen: *listen, ExternalBrokerURL: *external, HTTPListen: *httpAddr, Thing: *thing, Seed: *seed, Logger: logger,
		NoQuotas: *noQuotas,
		OnUpdate: func(ev emulator.UpdateEvent) {
			printf("update %s thing=%s job=%s status=%s version=%d by=%s details=%s\n",
				ev.At.UTC().Format(time.RFC3339Nano), ev.Thing, ev.JobID, ev.Status, ev.VersionNumber, ev.Source, formatDetails(ev.StatusDetails))
		},
	})
	if err != nil {
		return err
	}
	defer e.Close()
	printf("broker %s\nhttp %s\nthing %s\n", e.BrokerURL(), e.HTTPURL(), e.ThingName())

	for i, f := range files {
		id := fmt.Sprintf("ota-%d-%s", i+1, unsafeID.ReplaceAllString(strings.TrimSuffix(filepath.Base(f), filepath.Ext(f)), "_"))
		if len(id) > 64 {
			id = id[:64]
		}
		spec := backend.JobSpec{JobID: id, Protocols: strings.Split(*protocols, ","), Files: []backend.FileSpec{{
			LocalPath: f, DevicePath: *devicePath, CertName: *certFile, FileType: *fileType,
			SigningKeyPEM: keyPEM, SigAlgorithm: *sigAlg,
		}}}
		if err := e.CreateJob(ctx, spec); err != nil {
			return err
		}
		printf("job %s file=%s stream=%s\n", id, f, e.StreamName(id))
	}
	<-ctx.Done()
	return nil
}

// formatDetails prints statusDetails in a stable order, quoted, on one line.
func formatDetails(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%q:%q", k, m[k])
	}
	b.WriteByte('}')
	return b.String()
}
