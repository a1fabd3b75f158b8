package agent_test

import (
	"bytes"
	"context"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/agent"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/writer/manifest"
)

// deltaJob builds a manifest and chunk file of img (block 4 KiB, chunks of 16 KiB), signs
// the manifest with the shared openssl signer, and creates the two-file job.
func deltaJob(t *testing.T, e *emulator.Emulator, id string, protocols []string, img []byte, version string) *manifest.Manifest {
	t.Helper()
	dir := t.TempDir()
	var chunks, mf bytes.Buffer
	if _, err := manifest.Build(context.Background(), bytes.NewReader(img), manifest.Params{
		Target: "rootfs", Compatible: "acme,gw-1", Version: version, BlockSize: 4096, TempDir: dir}, &chunks, &mf); err != nil {
		t.Fatal(err)
	}
	mPath, cPath := filepath.Join(dir, "m"), filepath.Join(dir, "c")
	if err := os.WriteFile(mPath, mf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cPath, chunks.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	sig, err := opensslSigner(t).SignFile(mPath)
	if err != nil {
		t.Fatal(err)
	}
	files := backend.DeltaFiles(backend.FileSpec{LocalPath: mPath, DevicePath: "/opt/fw/x.img", CertName: "signer.crt.pem",
		Signature: sig, SigAlgorithm: backend.SigSHA256ECDSA}, cPath)
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: id, Protocols: protocols, Files: files}); err != nil {
		t.Fatal(err)
	}
	m, err := manifest.Open(bytes.NewReader(mf.Bytes()), int64(mf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// deltaImage is slotSize bytes like the writer rig's running slot (0xEE), with blocks
// rewritten at random and a zero region.
func deltaImage(rewrite ...int) []byte {
	img := bytes.Repeat([]byte{0xEE}, slotSize)
	r := mrand.New(mrand.NewPCG(1, 2))
	for _, b := range rewrite {
		for i := b * 4096; i < (b+1)*4096; i++ {
			img[i] = byte(r.Uint32())
		}
	}
	clear(img[512<<10 : 1<<20])
	return img
}

// TestDeltaUpdate: over either protocol, the agent installs the manifest first, then the
// chunk file, fetching only what overlaps the chunks holding the rewritten blocks (over
// HTTP in byte ranges); progress counts those stream blocks, and ready says how many image
// blocks were reused or zero.
func TestDeltaUpdate(t *testing.T) {
	for _, proto := range []string{"MQTT", "HTTP"} {
		t.Run(proto, func(t *testing.T) {
			e := startEmulator(t)
			w := newWriter(t, "/bin/true")
			startDevice(t, e, w, agent.Config{PreferHTTP: proto == "HTTP"})
			rewritten := []int{5, 6, 300, 900}
			img := deltaImage(rewritten...)
			m := deltaJob(t, e, "delta", []string{"MQTT", "HTTP"}, img, "2.0.0")
			waitReboot(t, w)
			ex := waitStatus(t, e, "delta", jobs.StatusInProgress)
			if ex.StatusDetails["self_test"] != "ready" {
				t.Fatalf("%+v", ex)
			}
			slot, err := os.ReadFile(w.slots[1])
			if err != nil || !bytes.Equal(slot[:len(img)], img) {
				t.Fatalf("slot b does not hold the image (%v)", err)
			}
			// Blocks 5 and 6 share a chunk (16 KiB chunks): three chunks to download.
			if want := fmt.Sprintf("%d/%d", m.Blocks()-uint64(len(rewritten)), m.Blocks()); ex.StatusDetails["reused"] != want {
				t.Errorf("reused %q, want %q", ex.StatusDetails["reused"], want)
			}
			need := 0
			for k := 0; k < m.Chunks(); k++ {
				c := m.Chunk(k)
				for _, b := range rewritten {
					if uint64(b) >= c.FirstBlock && uint64(b) < c.FirstBlock+c.Blocks {
						need += int(c.Size)
						break
					}
				}
			}
			switch proto {
			case "HTTP":
				// The manifest whole, then the chunk file's ranges: what they cover is the
				// needed chunks rounded out to the blocks of the download.
				got := e.HTTPBytes("delta")
				if got < int64(need) || got > int64(need)+int64(m.Blocks()*32+64<<10) {
					t.Errorf("HTTP served %d bytes for %d bytes of needed chunks (ranges %v)", got, need, e.HTTPRanges("delta"))
				}
			case "MQTT":
				var fetched int64
				for _, r := range e.StreamRequests("delta") {
					if r.FileID == 1 {
						fetched += int64(len(r.Sent)) * r.BlockSize
					}
				}
				if fetched < int64(need) || fetched > 3*int64(need)+16<<10 {
					t.Errorf("stream served %d bytes of the chunk file for %d bytes of needed chunks", fetched, need)
				}
			}
			// Progress of the chunk file ends at what it had to fetch, not the file's blocks.
			p := strings.Split(ex.StatusDetails["progress"], "/")
			if n, _ := strconv.Atoi(p[1]); len(p) != 2 || p[0] != p[1] || n == 0 || n > need/1024+6 {
				t.Errorf("ready progress %q for %d bytes to fetch", ex.StatusDetails["progress"], need)
			}
			if diff := cmp.Diff([]string{"IN_PROGRESS:receiving", "IN_PROGRESS:ready"}, selfTests(e, "delta")); diff != "" {
				t.Errorf("updates (-want +got):\n%s", diff)
			}
		})
	}
}

// TestJobWithoutManifestUnchanged: a plain image job never begins a manifest or chunks
// session and reports no "reused".
func TestJobWithoutManifestUnchanged(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	startDevice(t, e, w, agent.Config{})
	img := newImage(t, 40*1024)
	createJob(t, e, "plain", []string{"MQTT"}, img, 0, nil)
	waitReboot(t, w)
	ex := waitStatus(t, e, "plain", jobs.StatusInProgress)
	if ex.StatusDetails["self_test"] != "ready" || ex.StatusDetails["progress"] != "10/10" {
		t.Fatalf("%+v", ex)
	}
	if _, ok := ex.StatusDetails["reused"]; ok {
		t.Errorf("a plain image job reports reused: %v", ex.StatusDetails)
	}
}
