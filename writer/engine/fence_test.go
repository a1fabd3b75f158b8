package engine

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/config"
)

// calls drives the real engine of a rig through a sequence of calls and notes each outcome as
// "call: ok" or "call: <reason>", so a whole order of calls compares as one transcript.
type calls struct {
	t    *testing.T
	r    *rig
	got  []string
	imgs map[string]image
	ids  map[string]string
}

const fenceBlock = 4096

func newCalls(t *testing.T, r *rig) *calls {
	c := &calls{t: t, r: r, imgs: map[string]image{}, ids: map[string]string{}}
	for _, job := range []string{"job-1", "job-2"} {
		c.imgs[job] = newImage(t, 10*fenceBlock+123)
	}
	return c
}

func (c *calls) note(call string, err error) {
	res := "ok"
	if err != nil {
		res = status.Name(status.ReasonOf(err))
	}
	c.got = append(c.got, call+": "+res)
}

// begin starts (or resumes) job's session on target rootfs (file type 0) or app (1).
func (c *calls) begin(job string, fileType int32) {
	res, err := c.r.begin(c.imgs[job], fileType, func(q *otav1.BeginSessionRequest) { q.JobId = job; q.BlockSize = fenceBlock })
	if err == nil {
		c.ids[job] = res.GetSession().GetSessionId()
	}
	c.note("begin "+job, err)
}

// write sends blocks [from, to) of job's image, syncing when asked.
func (c *calls) write(job string, from, to int, sync bool) {
	_, err := c.r.e.Write(ctx, c.ids[job], blocks(c.imgs[job].data, fenceBlock, from, to), sync)
	c.note("write "+job, err)
}

func (c *calls) writeAll(job string) { c.write(job, 0, 11, true) }

func (c *calls) finish(job string) {
	_, err := c.r.e.Finish(ctx, c.ids[job])
	c.note("finish "+job, err)
}

func (c *calls) activate(job string) {
	_, err := c.r.e.Activate(ctx, c.ids[job])
	c.note("activate "+job, err)
}

// other is another actor switching the boot state under the writer (an operator's
// fw_setenv, a vendor tool): the writer did not do it and cannot prevent it.
func (c *calls) other(slot string) {
	c.note("other actor activates "+slot, c.r.boot.Activate(ctx, slot))
}

// restart is a new writer process on the same state; reboot also runs the bootloader.
func (c *calls) restart() {
	c.r.e.Close()
	c.r.open()
	st, err := c.r.e.State(ctx)
	c.note("restart", err)
	c.got = append(c.got, "sessions after restart: "+strings.Repeat("S", len(st.GetSessions())))
}

func (c *calls) reboot() {
	c.r.e.Close()
	c.note("reboot", c.r.boot.Boot(ctx, ""))
	c.r.open()
}

// TestNoWriteIntoPendingOrBootedSlot drives the engine through orders of calls that try to
// write the slot that runs or the slot activated for the next boot. Whatever the order, no
// block lands there after the switch, no such block is journaled durable, and no such image
// is verified or activated. "Other actor" rows switch the boot state behind the engine's
// back; the engine catches it at the latest where blocks would become durable or be
// verified.
func TestNoWriteIntoPendingOrBootedSlot(t *testing.T) {
	full := func(c *calls, job string) { c.begin(job, 0); c.writeAll(job); c.finish(job); c.activate(job) }
	fullLog := func(job string) []string {
		return []string{"begin " + job + ": ok", "write " + job + ": ok", "finish " + job + ": ok", "activate " + job + ": ok"}
	}
	for _, tc := range []struct {
		name string
		run  func(c *calls)
		want []string
		// untouched: after the run, slot b holds job-1's image (or its factory content when
		// "") beyond the blocks written before any switch.
		slotB string
	}{{
		name: "begin another job after an activation",
		run:  func(c *calls) { full(c, "job-1"); c.begin("job-2", 0) },
		want: append(fullLog("job-1"), "begin job-2: bad_image_state"), slotB: "job-1",
	}, {
		name: "the activated job begins again",
		run:  func(c *calls) { full(c, "job-1"); c.begin("job-1", 0) },
		want: append(fullLog("job-1"), "begin job-1: bad_image_state"), slotB: "job-1",
	}, {
		name: "write after its own activation",
		run:  func(c *calls) { full(c, "job-1"); c.write("job-1", 0, 1, true) },
		want: append(fullLog("job-1"), "write job-1: bad_file_handle"), slotB: "job-1",
	}, {
		name: "other actor activates the slot while a session writes",
		run: func(c *calls) {
			c.begin("job-1", 0)
			c.write("job-1", 0, 3, false)
			c.other("b")
			c.write("job-1", 3, 11, true)
			c.finish("job-1")
			c.begin("job-1", 0)
		},
		want: []string{"begin job-1: ok", "write job-1: ok", "other actor activates b: ok", "write job-1: bad_image_state",
			"finish job-1: bad_file_handle", "begin job-1: bad_image_state"},
	}, {
		name: "other actor activates the slot before blocks are made durable",
		run: func(c *calls) {
			c.begin("job-1", 0)
			c.write("job-1", 0, 3, false)
			c.other("b")
			c.write("job-1", 3, 3, true)
			c.restart()
		},
		want: []string{"begin job-1: ok", "write job-1: ok", "other actor activates b: ok", "write job-1: bad_image_state",
			"restart: ok", "sessions after restart: "},
	}, {
		name: "other actor activates the slot before finish",
		run: func(c *calls) {
			c.begin("job-1", 0)
			c.writeAll("job-1")
			c.other("b")
			c.finish("job-1")
			c.activate("job-1")
		},
		want: []string{"begin job-1: ok", "write job-1: ok", "other actor activates b: ok", "finish job-1: bad_image_state",
			"activate job-1: bad_file_handle"},
		slotB: "job-1", // every block was written before the switch
	}, {
		name: "other actor activates the slot, the same job resumes",
		run: func(c *calls) {
			c.begin("job-1", 0)
			c.write("job-1", 0, 3, true)
			c.other("b")
			c.begin("job-1", 0)
			c.write("job-1", 3, 11, true)
		},
		want: []string{"begin job-1: ok", "write job-1: ok", "other actor activates b: ok", "begin job-1: bad_image_state",
			"write job-1: bad_file_handle"},
	}, {
		name: "writer restarts with its session's slot activated",
		run: func(c *calls) {
			c.begin("job-1", 0)
			c.write("job-1", 0, 3, true)
			c.other("b")
			c.restart()
			c.write("job-1", 3, 11, true)
		},
		want: []string{"begin job-1: ok", "write job-1: ok", "other actor activates b: ok", "restart: ok", "sessions after restart: ",
			"write job-1: bad_file_handle"},
	}, {
		name: "trial boot: nothing may begin",
		run:  func(c *calls) { full(c, "job-1"); c.reboot(); c.begin("job-2", 0) },
		want: append(fullLog("job-1"), "reboot: ok", "begin job-2: bad_image_state"), slotB: "job-1",
	}, {
		name: "rejected trial before its reboot: nothing may begin",
		run: func(c *calls) {
			full(c, "job-1")
			c.reboot()
			_, err := c.r.e.Reject(ctx, "job-1", otav1.Reason_REASON_SELF_TEST_FAILED)
			c.note("reject job-1", err)
			c.begin("job-2", 0)
		},
		want: append(fullLog("job-1"), "reboot: ok", "reject job-1: ok", "begin job-2: bad_image_state"), slotB: "job-1",
	}, {
		name: "a plain file target is not fenced by the A/B activation",
		run: func(c *calls) {
			full(c, "job-1")
			c.begin("job-2", 1)
			c.writeAll("job-2")
			c.finish("job-2")
			c.activate("job-2")
		},
		want: append(fullLog("job-1"), "begin job-2: ok", "write job-2: ok", "finish job-2: ok", "activate job-2: ok"), slotB: "job-1",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, func(c *config.Config) { c.Targets[1].MaxSize = 0 })
			c := newCalls(t, r)
			tc.run(c)
			if d := cmp.Diff(tc.want, c.got); d != "" {
				t.Fatalf("calls (-want +got):\n%s", d)
			}
			factory := bytes.Repeat([]byte{0xEE}, slotSize)
			if a, _ := os.ReadFile(r.slots[0]); !bytes.Equal(a, factory) {
				t.Error("slot a (running) was written")
			}
			b, _ := os.ReadFile(r.slots[1])
			want := factory
			if tc.slotB != "" {
				want = append(append([]byte(nil), c.imgs[tc.slotB].data...), factory[len(c.imgs[tc.slotB].data):]...)
			} else {
				// Only the 3 blocks written before the other actor's switch may be there.
				want = append(append([]byte(nil), c.imgs["job-1"].data[:3*fenceBlock]...), factory[3*fenceBlock:]...)
			}
			if !bytes.Equal(b, want) {
				t.Error("slot b holds blocks written after it was activated")
			}
		})
	}
}
