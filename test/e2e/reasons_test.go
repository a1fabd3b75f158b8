package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
	"github.com/gwota/gwota/test/tinyfs"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/engine"
)

// Where a row drives its reason.
const (
	// levelE2E: ota-writer and ota-net as processes, the emulator as AWS; the reason is read
	// from the job's statusDetails (or, where AWS cannot show it, from the device).
	levelE2E = "e2e"
	// levelProcess: real processes, no job can carry the reason (the process stops first).
	levelProcess = "process"
	// levelWriter: a real ota-writer process over its socket, driven by a client that
	// breaks the protocol in a way ota-net never does.
	levelWriter = "writer"
	// levelEngine: the writer's engine in this process, on real files and the file boot
	// backend, for a state no sequence of calls over the socket reaches.
	levelEngine = "engine"
	// levelStatus: the reason table itself, for values that are never raised.
	levelStatus = "status"
)

type reasonRow struct {
	level string
	run   func(t *testing.T, want otav1.Reason)
}

// TestEveryReason drives each value of the Reason enum at least once, where it can occur.
// The list comes from the enum: a new reason without a row here fails the test.
func TestEveryReason(t *testing.T) {
	t.Parallel()
	rows := reasonRows()
	var all []otav1.Reason
	for n := range otav1.Reason_name {
		all = append(all, otav1.Reason(n))
	}
	slices.Sort(all)
	for _, r := range all {
		row, ok := rows[r]
		if !ok {
			t.Errorf("%s (%d) has no row in reasonRows: add one that drives it", r, r)
			continue
		}
		t.Run(fmt.Sprintf("%d_%s_%s", int32(r), status.Name(r), row.level), func(t *testing.T) {
			t.Parallel()
			row.run(t, r)
		})
	}
	for r := range rows {
		if _, ok := otav1.Reason_name[int32(r)]; !ok {
			t.Errorf("row for %d, which the enum does not have", r)
		}
	}
}

func reasonRows() map[otav1.Reason]reasonRow {
	R := func(name string) otav1.Reason { return otav1.Reason(otav1.Reason_value["REASON_"+name]) }
	return map[otav1.Reason]reasonRow{
		// The proto default, never raised: it reads as other/1099 wherever it shows.
		R("UNSPECIFIED"): {levelStatus, func(t *testing.T, want otav1.Reason) {
			if status.Name(want) != "other" || status.Code(want) != "1099" {
				t.Fatalf("%s shows as %s/%s, want other/1099", want, status.Name(want), status.Code(want))
			}
		}},
		// The catch-all for an error that carries no typed reason; every failure path of
		// the product has its own, so it is driven through the typing boundary itself.
		R("OTHER"): {levelStatus, func(t *testing.T, want otav1.Reason) {
			plain := errors.New("an untyped failure")
			if got := status.ReasonOf(plain); got != want {
				t.Fatalf("ReasonOf(untyped) = %s", got)
			}
			st, _ := grpcstatus.FromError(status.ToGRPC(plain))
			if st.Code() != codes.Internal || status.ReasonOf(st.Err()) != want {
				t.Fatalf("ToGRPC(untyped) = %v", st)
			}
		}},

		R("SIG_CHECK_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			f := e.alteredFile()
			e.start()
			e.createJob("j", f)
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// Slot b sits on a read-only mount: opening it for writing fails (EROFS).
		R("FILE_WRITE_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			tinyfs.ReadOnly(t, e.dev.SlotB)
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 4)))
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		R("FILE_TOO_LARGE"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.writerTOML(func(w map[string]any) { w["target"].([]map[string]any)[0]["max_size"] = smallImage / 2 })
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 5)))
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		// A plain-file target whose destination turned into a directory: the verified file
		// cannot be renamed into place.
		R("FILE_CLOSE_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			dest := e.addFileTarget()
			e.start()
			if err := os.MkdirAll(filepath.Join(dest, "in-the-way"), 0o755); err != nil {
				t.Fatal(err)
			}
			f := e.signer.File(e.image("app.img", smallImage, 6))
			f.DevicePath, f.FileType = appPath, 1
			e.createJob("j", f)
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// An operator aborts the session through the writer while ota-net downloads into it:
		// the next blocks name a session that is gone.
		R("BAD_FILE_HANDLE"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, paced)
			e.startPaced("j", e.signer.File(e.image("v2.img", midImage, 7)))
			waitMid(t, e, "j")
			c, err := e.dev.WriterClient(e.ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.Abort(e.ctx, e.sessionOf("j").GetSessionId(), otav1.Reason_REASON_USER_ABORT); err != nil {
				t.Fatal(err)
			}
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// Slot b is a directory, neither a block device nor a regular file.
		R("UNSUPPORTED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			if err := os.Remove(e.dev.SlotB); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(e.dev.SlotB, 0o700); err != nil {
				t.Fatal(err)
			}
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 8)))
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		// The reboot after an activation failed, the slot waits for a reboot: a new job
		// must not overwrite the image about to be tried.
		R("BAD_IMAGE_STATE"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.writerTOML(func(w map[string]any) { w["reboot_command"] = []string{"/bin/false"} })
			e.start()
			e.createJob("j1", e.signer.File(e.image("v2.img", smallImage, 9)))
			e.wantEnd("j1", backend.StatusFailed, otav1.Reason_REASON_REBOOT_FAILED)
			e.createJob("j2", e.signer.File(e.image("v3.img", smallImage, 10)))
			e.wantEnd("j2", backend.StatusRejected, want)
		}},
		// The self-test check turns the writer's state directory (which holds the boot
		// state) read-only: the commit cannot be stored.
		R("COMMIT_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			mount, err := exec.LookPath("mount")
			if err != nil {
				t.Fatal(err)
			}
			var state string
			e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
				state = filepath.Join(o.Dir, "writer-state") // harness.Device.WriterState
				o.Checks = []harness.Check{{Name: "freeze-state", Command: []string{mount, "-o", "remount,bind,ro", state}}}
			})
			if state != e.dev.WriterState {
				t.Fatalf("writer state dir %s, the check remounts %s", e.dev.WriterState, state)
			}
			tinyfs.Bind(t, state)
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 11)))
			ex := e.wantEnd("j", backend.StatusFailed, want)
			if ex.StatusDetails["self_test"] != "rejected" {
				t.Errorf("statusDetails %v, want self_test rejected", ex.StatusDetails)
			}
		}},
		// Version policy "newer" needs a version; the job names none.
		R("VERSION_CHECK"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.writerTOML(func(w map[string]any) { w["version_policy"] = config.VersionNewer })
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 12)))
			e.wantEnd("j", backend.StatusRejected, want)
		}},

		// A newer job is announced while the current one is still open and downloading.
		R("NEWER_JOB"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, paced)
			e.startPaced("j", e.signer.File(e.image("v2.img", midImage, 13)))
			waitMid(t, e, "j")
			e.createJob("j-newer", e.signer.File(e.image("v3.img", smallImage, 14)))
			if err := e.cloud.AnnounceNext(thing, "j-newer"); err != nil {
				t.Fatal(err)
			}
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// The stream refuses the block requests as malformed.
		R("FAILED_INGEST"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.startWithStreamFaults("j", e.signer.File(e.image("v2.img", smallImage, 15)), emulator.Faults{RejectCode: "InvalidRequest"})
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// No block ever arrives.
		R("MOMENTUM_ABORT"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.netTOML(func(n map[string]any) { n["quiet_period"] = "100ms"; n["max_fruitless_rounds"] = 2 })
			e.startWithStreamFaults("j", e.signer.File(e.image("v2.img", smallImage, 16)), emulator.Faults{Drop: 1})
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// The job is canceled while the device reboots into its trial: at start ota-net
		// finds a trial boot for a job that is gone and rolls it back. No job is left to
		// report to; the writer records the reason of the rollback.
		R("STATE_MISMATCH"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			var cloud atomic.Pointer[harness.Cloud]
			e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
				o.OnReboot = func(n int, done bool, _ error) {
					if n == 1 && !done {
						if err := cloud.Load().CancelJob(context.Background(), "j", true); err != nil {
							t.Errorf("cancel during the reboot: %v", err)
						}
					}
				}
			})
			cloud.Store(e.cloud)
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 17)))
			if ex := e.waitEnd("j"); ex.Status != backend.StatusCanceled {
				t.Fatalf("job %s, want CANCELED", ex.Status)
			}
			if err := e.dev.WaitReboots(e.ctx, 2); err != nil { // into the trial, and back
				t.Fatal(err)
			}
			st, err := e.dev.State(e.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.GetLastUpdate().GetJobId() != "j" || st.GetLastUpdate().GetReason() != want {
				t.Fatalf("writer's last update %v, want job j rolled back with %s", st.GetLastUpdate(), want)
			}
		}},
		R("INVALID_PROTOCOL"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.startWithDocument("j", e.signer.File(e.image("v2.img", smallImage, 18)), func(d json.RawMessage) json.RawMessage {
				return bytes.ReplaceAll(d, []byte(`"MQTT"`), []byte(`"FTP"`))
			})
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		// Canceled in the cloud mid-download. AWS shows CANCELED with no reason of the
		// device's: user_abort is what the writer's session is aborted with and what
		// ota-net logs.
		R("USER_ABORT"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, paced)
			e.startPaced("j", e.signer.File(e.image("v2.img", midImage, 19)))
			waitMid(t, e, "j")
			if err := e.cloud.CancelJob(e.ctx, "j", true); err != nil {
				t.Fatal(err)
			}
			if ex := e.waitEnd("j"); ex.Status != backend.StatusCanceled {
				t.Fatalf("job %s, want CANCELED", ex.Status)
			}
			e.waitNoSession()
			// The engine drops the session before it logs why, so the line may come just
			// after the state shows no session.
			for _, log := range []string{e.dev.NetLog, e.dev.WriterLog} {
				e.waitLog(log, status.Name(want))
			}
		}},
		// The job names version 2.0 when the device installs it, and 3.0 by the time the
		// trial boot checks: the image on trial is not the one the job names.
		R("SELF_TEST_VERSION_CHECK"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			var cloud atomic.Pointer[harness.Cloud]
			version := func(v string) func(json.RawMessage) json.RawMessage {
				return func(d json.RawMessage) json.RawMessage {
					return bytes.Replace(d, []byte(`"fileid":`), []byte(`"version":"`+v+`","fileid":`), 1)
				}
			}
			e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
				o.OnReboot = func(n int, done bool, _ error) {
					if n == 1 && !done {
						if err := cloud.Load().RewriteDocument("j", version("3.0")); err != nil {
							t.Errorf("rewrite during the reboot: %v", err)
						}
					}
				}
			})
			cloud.Store(e.cloud)
			e.startWithDocument("j", e.signer.File(e.image("v2.img", smallImage, 20)), version("2.0"))
			ex := e.wantEnd("j", backend.StatusFailed, want)
			if ex.StatusDetails["self_test"] != "rejected" {
				t.Errorf("statusDetails %v, want self_test rejected", ex.StatusDetails)
			}
			e.waitRolledBack()
		}},

		// The writer goes away after ota-net linked to it and does not come back within
		// writer_wait_timeout.
		R("WRITER_UNAVAILABLE"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.netTOML(func(n map[string]any) { n["writer_wait_timeout"] = "2s" })
			e.start()
			e.syncJob()
			if err := e.dev.KillWriter(e.ctx); err != nil {
				t.Fatal(err)
			}
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 21)))
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		// ota-net under a uid the writer does not allow: it stops at its start with the
		// reason, before it could take any job.
		R("PERMISSION_DENIED"): {levelProcess, func(t *testing.T, want otav1.Reason) {
			setpriv, err := exec.LookPath("setpriv")
			if err != nil {
				t.Fatal(err)
			}
			tinyfs.Need(t)
			e := newEnv(t, embedded, nil)
			e.writerTOML(func(w map[string]any) { w["socket_group"] = "nogroup" })
			if err := e.dev.StartWriter(e.ctx); err != nil {
				t.Fatal(err)
			}
			// nobody:nogroup reaches the socket (group nogroup) but is not a peer uid.
			for _, d := range []string{e.dir, e.dev.Dir, bin.Dir} {
				if err := os.Chmod(d, 0o711); err != nil {
					t.Fatal(err)
				}
			}
			own, err := os.MkdirTemp("", "nobody")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(own) })
			if err := os.Chmod(own, 0o755); err != nil {
				t.Fatal(err)
			}
			state := filepath.Join(own, "state")
			if err := os.Mkdir(state, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(state, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			cfg := filepath.Join(own, "net.toml")
			copyTOML(t, e.dev.NetConfig, cfg, func(n map[string]any) { n["state_dir"] = state })
			if err := os.Chmod(cfg, 0o644); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
			defer cancel()
			out, err := exec.CommandContext(ctx, setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--",
				bin.Net, "--config", cfg).CombinedOutput()
			if err == nil || !bytes.Contains(out, []byte(status.String(want))) {
				t.Fatalf("ota-net as nobody: %v, want it to stop naming %s:\n%s", err, status.String(want), out)
			}
		}},
		R("TARGET_UNKNOWN"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.start()
			f := e.signer.File(e.image("v2.img", smallImage, 22))
			f.DevicePath, f.FileType = "/nowhere", 7
			e.createJob("j", f)
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		// ota-net computes offsets from the writer's own session (block size and bitmap), so
		// only a client breaking the protocol sends one outside the image.
		R("BLOCK_OUT_OF_RANGE"): {levelWriter, func(t *testing.T, want otav1.Reason) {
			e, c, req := writerOnly(t)
			b, err := c.Begin(e.ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.WriteBatch(e.ctx, b.GetSession().GetSessionId(), 1,
				[]*otav1.Block{{Offset: req.GetFileSize() + 4096, Data: make([]byte, 4096)}}, false)
			wantWriterReason(t, err, want)
		}},
		R("SELF_TEST_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
				o.Checks = []harness.Check{{Name: "app-health", Command: []string{"/bin/false"}}}
			})
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 23)))
			e.wantEnd("j", backend.StatusFailed, want)
			e.waitRolledBack()
		}},
		R("SELF_TEST_TIMEOUT"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
				o.Checks = []harness.Check{{Name: "hangs", Command: []string{"/bin/sleep", "60"}, Timeout: time.Second}}
			})
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 24)))
			e.wantEnd("j", backend.StatusFailed, want)
			e.waitRolledBack()
		}},
		// The trial boot never gets to commit (its check hangs) and the device reboots past
		// the boot limit: the bootloader falls back to the committed slot.
		R("ROLLED_BACK"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
				o.Checks = []harness.Check{{Name: "hangs", Command: []string{"/bin/sleep", "60"}, Timeout: 50 * time.Second}}
			})
			e.writerTOML(func(w map[string]any) { w["boot"].(map[string]any)["boot_limit"] = 1 })
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 25)))
			if _, err := e.cloud.WaitSelfTest(e.ctx, "j", backend.StatusInProgress, "active"); err != nil {
				t.Fatal(err)
			}
			if err := e.dev.Reboot(e.ctx); err != nil {
				t.Fatal(err)
			}
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// The stream does not exist (any more).
		R("DOWNLOAD_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.startWithStreamFaults("j", e.signer.File(e.image("v2.img", smallImage, 26)), emulator.Faults{RejectCode: "ResourceNotFound"})
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// Through a web proxy that refuses the file server's port.
		R("PROXY_FAILED"): {levelE2E, proxyRefusesFiles},
		R("JOB_DOCUMENT_INVALID"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.start()
			if err := e.cloud.CreateCustomJob(e.ctx, "j", []byte(`{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":"0x0","fileid":0}]}}`)); err != nil {
				t.Fatal(err)
			}
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		// The writer's state directory is a small real tmpfs that fills up mid-download: the
		// next journal save finds no space.
		R("STORAGE_FULL"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, paced)
			tinyfs.MountTmpfs(t, e.dev.WriterState, 512<<10)
			e.startPaced("j", e.signer.File(e.image("v2.img", midImage, 27)))
			waitMid(t, e, "j")
			tinyfs.Fill(t, e.dev.WriterState)
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// ota-net checks job ids, sizes and block sizes before it asks; only another client
		// sends a malformed request.
		R("INVALID_REQUEST"): {levelWriter, func(t *testing.T, want otav1.Reason) {
			e, c, req := writerOnly(t)
			req.BlockSize = 7
			_, err := c.Begin(e.ctx, req)
			wantWriterReason(t, err, want)
		}},
		// A job whose two files both go to the one A/B target: the second cannot begin while
		// the first holds the target.
		R("SESSION_BUSY"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.start()
			f1 := e.signer.File(e.image("v2.img", smallImage, 28))
			f2 := e.signer.File(e.image("v2b.img", smallImage, 29))
			f2.FileID = 1
			if err := e.cloud.CreateJob(e.ctx, backend.JobSpec{JobID: "j", Protocols: []string{backend.ProtocolMQTT}, Files: []backend.FileSpec{f1, f2}}); err != nil {
				t.Fatal(err)
			}
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		// A chunk of a delta update altered in transit three times (test/e2e/delta_test.go).
		R("BLOCK_HASH_MISMATCH"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			alteredChunk(t, 3)
		}},
		// ota-net and ota-writer ship together; only a mismatched install speaks another
		// protocol version.
		R("PROTOCOL_VERSION"): {levelWriter, func(t *testing.T, want otav1.Reason) {
			e, c, _ := writerOnly(t)
			_, err := c.Raw().Handshake(e.ctx, &otav1.HandshakeRequest{ProtocolVersion: otav1.ProtocolVersion(2), Client: "from the future"})
			wantWriterReason(t, err, want)
		}},
		R("REBOOT_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.writerTOML(func(w map[string]any) { w["reboot_command"] = []string{"/bin/false"} })
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 30)))
			e.wantEnd("j", backend.StatusFailed, want)
		}},
		R("UNTRUSTED_SIGNER"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.start()
			f := e.signer.File(e.image("v2.img", smallImage, 31))
			f.CertName = "someone-else.crt.pem"
			e.createJob("j", f)
			e.wantEnd("j", backend.StatusRejected, want)
		}},
		// The cloud refuses the "ready" update for good (a non-retryable rejection): the
		// job fails before anything is activated, and says why.
		R("JOB_UPDATE_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			e := newEnv(t, embedded, nil)
			e.cloud.SetFaults("j", emulator.Faults{RejectUpdate: func(_ string, d map[string]string) string {
				if d["self_test"] == "ready" {
					return "InvalidRequest"
				}
				return ""
			}})
			e.start()
			before := e.slots()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 32)))
			e.wantEnd("j", backend.StatusFailed, want)
			if after := e.slots(); after.Boot != before.Boot {
				t.Errorf("boot state changed although ready never reached the cloud:\n%s\n%s", before.Boot, after.Boot)
			}
		}},
		// The slot a session wrote became the running one behind its back (the bootloader
		// switched by hand, outside the writer). Begin refuses any session while a switch is
		// pending or on trial, so no sequence of calls over the socket gets there.
		R("SESSION_LOST"): {levelEngine, func(t *testing.T, want otav1.Reason) {
			ctx := context.Background()
			dir := t.TempDir()
			signer, err := harness.NewSigner("lost")
			if err != nil {
				t.Fatal(err)
			}
			cert, err := signer.WriteCert(dir)
			if err != nil {
				t.Fatal(err)
			}
			slots := []string{filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")}
			for _, p := range slots {
				if err := os.WriteFile(p, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			img := filepath.Join(dir, "v2.img")
			if err := harness.WriteImage(img, 8192, 33); err != nil {
				t.Fatal(err)
			}
			data, _ := os.ReadFile(img)
			sig, err := signer.SignFile(img)
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			if err := toml.NewEncoder(&buf).Encode(map[string]any{
				"state_dir": filepath.Join(dir, "state"), "trusted_keys": []string{cert},
				"target": []map[string]any{{"name": "rootfs", "kind": "ab", "file_types": []int{0}, "slots": slots}},
			}); err != nil {
				t.Fatal(err)
			}
			cfg, err := config.Parse(buf.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
				t.Fatal(err)
			}
			fb, err := boot.NewFile(filepath.Join(cfg.StateDir, "boot.json"), 3, nil)
			if err != nil {
				t.Fatal(err)
			}
			eng, err := engine.New(ctx, cfg, engine.Deps{Boot: fb, Reboot: func(context.Context) error { return nil }}, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer eng.Close()
			ft := int32(0)
			b, err := eng.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j", FileType: &ft, FileSize: uint64(len(data)), BlockSize: 4096,
				SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig, CertName: signer.CertName})
			if err != nil {
				t.Fatal(err)
			}
			id := b.GetSession().GetSessionId()
			if _, err := eng.Write(ctx, id, []*otav1.Block{{Offset: 0, Data: data[:4096]}, {Offset: 4096, Data: data[4096:]}}, true); err != nil {
				t.Fatal(err)
			}
			if _, err := eng.Finish(ctx, id); err != nil {
				t.Fatal(err)
			}
			// Behind the writer's back: slot b activated, booted and committed.
			for _, step := range []func(context.Context) error{
				func(ctx context.Context) error { return fb.Activate(ctx, "b") },
				func(ctx context.Context) error { return fb.Boot(ctx, "") },
				fb.Commit,
			} {
				if err := step(ctx); err != nil {
					t.Fatal(err)
				}
			}
			_, err = eng.Activate(ctx, id)
			if got := status.ReasonOf(err); got != want {
				t.Fatalf("Activate: %v (%s), want %s", err, status.Name(got), status.Name(want))
			}
		}},
		// fw_setenv (the real tool) cannot store the environment: it lives on a read-only
		// mount. Nothing is switched.
		R("BOOT_CONTROL_FAILED"): {levelE2E, func(t *testing.T, want otav1.Reason) {
			setenv, err := exec.LookPath("fw_setenv")
			if err != nil {
				t.Fatal(err)
			}
			e := newEnv(t, embedded, nil)
			envDir := filepath.Join(e.dev.Dir, "uboot")
			if err := os.Mkdir(envDir, 0o700); err != nil {
				t.Fatal(err)
			}
			envFile, fwcfg := filepath.Join(envDir, "uboot.env"), filepath.Join(envDir, "fw_env.config")
			def, script := filepath.Join(e.dir, "default.env"), filepath.Join(e.dir, "init.script")
			for p, s := range map[string]string{envFile: strings.Repeat("\x00", 0x4000), fwcfg: envFile + " 0x0000 0x4000\n", def: "", script: "boot_part=a\n"} {
				if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if out, err := exec.Command(setenv, "-c", fwcfg, "-f", def, "-s", script).CombinedOutput(); err != nil {
				t.Fatalf("fw_setenv: %v: %s", err, out)
			}
			e.writerTOML(func(w map[string]any) {
				w["boot"] = map[string]any{"backend": config.BootUBoot, "fw_env_config": fwcfg, "boot_limit": 3}
			})
			tinyfs.ReadOnly(t, envDir)
			e.start()
			e.createJob("j", e.signer.File(e.image("v2.img", smallImage, 34)))
			e.wantEnd("j", backend.StatusFailed, want)
			if e.dev.Reboots() != 0 {
				t.Errorf("the device rebooted after a failed activation")
			}
		}},
	}
}

// wantEnd waits for the end of jobID and checks its status and reason.
func (e *env) wantEnd(jobID, st string, want otav1.Reason) backend.Execution {
	e.t.Helper()
	ex := e.waitEnd(jobID)
	if ex.Status != st || ex.StatusDetails["reason"] != status.Name(want) || ex.StatusDetails["error_code"] != status.Code(want) {
		e.t.Fatalf("job %s ended %s %s/%s, want %s %s; updates %v", jobID, ex.Status, ex.StatusDetails["reason"], ex.StatusDetails["error_code"],
			st, status.String(want), harness.Steps(e.cloud.Updates(jobID)))
	}
	return ex
}

// writerTOML and netTOML edit the device's configurations (before the processes start).
func (e *env) writerTOML(edit func(map[string]any)) {
	e.t.Helper()
	copyTOML(e.t, e.dev.WriterConfig, e.dev.WriterConfig, edit)
}

func (e *env) netTOML(edit func(map[string]any)) {
	e.t.Helper()
	copyTOML(e.t, e.dev.NetConfig, e.dev.NetConfig, edit)
}

func copyTOML(t *testing.T, from, to string, edit func(map[string]any)) {
	t.Helper()
	m := map[string]any{}
	if _, err := toml.DecodeFile(from, &m); err != nil {
		t.Fatal(err)
	}
	// Arrays of tables decode as []map[string]any; keep that shape for the editors.
	if ts, ok := m["target"].([]map[string]any); ok {
		m["target"] = ts
	}
	edit(m)
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(m); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}

// appPath is the job file path of the plain-file target addFileTarget adds.
const appPath = "/opt/app/bundle.tar"

// addFileTarget adds a plain-file target (file type 1) and returns its destination.
func (e *env) addFileTarget() string {
	e.t.Helper()
	dir := filepath.Join(e.dev.Dir, "app")
	if err := os.Mkdir(dir, 0o755); err != nil {
		e.t.Fatal(err)
	}
	dest := filepath.Join(dir, "bundle.tar")
	e.writerTOML(func(w map[string]any) {
		w["target"] = append(w["target"].([]map[string]any), map[string]any{
			"name": "app", "kind": config.KindFile, "file_types": []int{1}, "file_paths": []string{appPath}, "path": dest,
		})
	})
	return dest
}

// startPaced starts the writer, creates the job with a slow stream, then starts ota-net.
func (e *env) startPaced(jobID string, f backend.FileSpec) {
	e.t.Helper()
	if err := e.dev.StartWriter(e.ctx); err != nil {
		e.t.Fatal(err)
	}
	e.createJob(jobID, f)
	slow(e, jobID)
	if err := e.dev.StartNet(e.ctx); err != nil {
		e.t.Fatal(err)
	}
}

// startWithStreamFaults starts the writer, creates the job, sets faults on its stream (not
// on the job: its updates stay untouched), then starts ota-net.
func (e *env) startWithStreamFaults(jobID string, f backend.FileSpec, faults emulator.Faults) {
	e.t.Helper()
	if err := e.dev.StartWriter(e.ctx); err != nil {
		e.t.Fatal(err)
	}
	e.createJob(jobID, f)
	e.cloud.SetFaults(e.cloud.StreamName(jobID), faults)
	if err := e.dev.StartNet(e.ctx); err != nil {
		e.t.Fatal(err)
	}
}

// startWithDocument starts the writer, creates the job with its document rewritten by fn,
// then starts ota-net.
func (e *env) startWithDocument(jobID string, f backend.FileSpec, fn func(json.RawMessage) json.RawMessage) {
	e.t.Helper()
	if err := e.dev.StartWriter(e.ctx); err != nil {
		e.t.Fatal(err)
	}
	e.createJob(jobID, f)
	if err := e.cloud.RewriteDocument(jobID, fn); err != nil {
		e.t.Fatal(err)
	}
	if err := e.dev.StartNet(e.ctx); err != nil {
		e.t.Fatal(err)
	}
}

// syncJob runs a job the device refuses at once: when it has ended, ota-net is up and
// linked to the writer.
func (e *env) syncJob() {
	e.t.Helper()
	f := e.signer.File(e.image("sync.img", 4096, 99))
	f.DevicePath, f.FileType = "/nowhere", 7
	e.createJob("sync", f)
	e.wantEnd("sync", backend.StatusRejected, otav1.Reason_REASON_TARGET_UNKNOWN)
}

// waitRolledBack waits for the reboot back into slot a that follows a rejected trial.
func (e *env) waitRolledBack() {
	e.t.Helper()
	if err := e.dev.WaitReboots(e.ctx, 2); err != nil {
		e.t.Fatal(err)
	}
}

// sessionOf is the writer's session of jobID.
func (e *env) sessionOf(jobID string) *otav1.SessionInfo {
	e.t.Helper()
	st, err := e.dev.State(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, s := range st.GetSessions() {
		if s.GetJobId() == jobID {
			return s
		}
	}
	e.t.Fatalf("the writer has no session of job %s: %v", jobID, st)
	return nil
}

// waitNoSession waits until the writer holds no session (ota-net aborts asynchronously).
func (e *env) waitNoSession() {
	e.t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := e.dev.State(e.ctx)
		if err != nil {
			e.t.Fatal(err)
		}
		if len(st.GetSessions()) == 0 {
			return
		}
		select {
		case <-e.ctx.Done():
			e.t.Fatalf("sessions still open: %v", st.GetSessions())
		case <-tick.C:
		}
	}
}

// waitLog waits until the log file at path contains s (a log has no change notification, so
// it is read again every 50 ms), and fails at the test's deadline.
func (e *env) waitLog(path, s string) {
	e.t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		b, err := os.ReadFile(path)
		if err != nil {
			e.t.Fatal(err)
		}
		if bytes.Contains(b, []byte(s)) {
			return
		}
		select {
		case <-e.ctx.Done():
			e.t.Fatalf("%s does not name %s", path, s)
		case <-tick.C:
		}
	}
}

// writerOnly starts a device's writer alone and returns a client and a valid
// BeginSessionRequest for its A/B target.
func writerOnly(t *testing.T) (*env, *client.Client, *otav1.BeginSessionRequest) {
	t.Helper()
	e := newEnv(t, embedded, nil)
	if err := e.dev.StartWriter(e.ctx); err != nil {
		t.Fatal(err)
	}
	c, err := e.dev.WriterClient(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	img := e.image("v2.img", smallImage, 40)
	sig, err := e.signer.SignFile(img)
	if err != nil {
		t.Fatal(err)
	}
	ft := int32(0)
	return e, c, &otav1.BeginSessionRequest{JobId: "j", FileType: &ft, FilePath: harness.DevicePath, FileSize: smallImage, BlockSize: 4096,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig, CertName: e.signer.CertName}
}

// wantWriterReason checks a writer answer: the reason in the status detail, and its gRPC
// code from the table.
func wantWriterReason(t *testing.T, err error, want otav1.Reason) {
	t.Helper()
	if got := status.ReasonOf(err); got != want {
		t.Fatalf("writer answered %v (%s), want %s", err, status.Name(got), status.Name(want))
	}
	var gs interface{ GRPCStatus() *grpcstatus.Status }
	if !errors.As(err, &gs) {
		t.Fatalf("writer answer %v carries no gRPC status", err)
	}
	if c := gs.GRPCStatus().Code(); c != status.GRPCCode(want) {
		t.Fatalf("gRPC code %s, want %s", c, status.GRPCCode(want))
	}
}
