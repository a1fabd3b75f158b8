package boot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Scheme is the bootloader variable scheme shared by the U-Boot and GRUB backends. It is
// U-Boot's own boot counting (CONFIG_BOOTCOUNT_LIMIT with CONFIG_BOOTCOUNT_ENV: the
// variables upgrade_available, bootcount, bootlimit and altbootcmd), the scheme Mender uses
// on both U-Boot and GRUB. It was chosen over RAUC's BOOT_ORDER/BOOT_x_LEFT because stock
// U-Boot implements it without a custom boot script, it has an explicit "trial pending"
// flag (RAUC's scheme cannot tell an uncommitted trial from a committed slot that was not
// yet marked good on this boot), and it gives a real boot limit on GRUB too.
//
// Variables (default names; all configurable in Vars):
//
//	boot_part          slot the bootloader boots (value per slot: SlotValues, default "a"/"b")
//	upgrade_available  "1" while a new slot is activated or on trial, "0" otherwise
//	bootcount          trial boots so far; the bootloader increments it on every boot while
//	                   upgrade_available=1 (U-Boot does this itself with BOOTCOUNT_ENV)
//	bootlimit          written at activation; when bootcount > bootlimit the bootloader runs
//	                   altbootcmd: switch boot_part back, set upgrade_available=0, save
//	ota_trial_slot     this writer's own marker: the slot of the last activation, cleared at
//	                   commit. Set with upgrade_available=0 it means the trial was rolled back.
//	ota_reject_boot    this writer's own marker: boot id of the boot in which a trial was
//	                   rejected, so that the rejected slot is still known to be running
//	                   until the reboot when the booted slot comes from the environment.
//
// Writer operations (each one atomic update of the environment):
//
//	Activate(s): boot_part=s upgrade_available=1 bootcount=0 bootlimit=N ota_trial_slot=s
//	Commit:      upgrade_available=0 bootcount=0 ota_trial_slot="" ota_reject_boot=""
//	Reject:      boot_part=<committed> upgrade_available=0 ota_reject_boot=<boot id>
//
// Booted slot: from the kernel command line when CmdlineKey is set (recommended in
// production: e.g. "rauc.slot" with values A/B, or "root" with the root device of each slot),
// otherwise from the environment: boot_part, except that with upgrade_available=1 and
// bootcount=0 the bootloader has not run yet, so the other slot is running.
type Scheme struct {
	// BootLimit is the number of trial boots before the bootloader rolls back (default 3).
	BootLimit int
	Vars      Vars
	// SlotValues maps "a"/"b" to the value of Vars.Slot (default: "a" and "b"; Mender-style
	// boards use partition numbers such as "2" and "3").
	SlotValues map[string]string
	// CmdlinePath is read for the booted slot when CmdlineKey is set (default /proc/cmdline).
	CmdlinePath string
	// CmdlineKey is the kernel parameter naming the booted slot ("rauc.slot", "root", ...).
	CmdlineKey string
	// CmdlineValues maps "a"/"b" to the parameter's value; default: "a"/"b" in any case.
	CmdlineValues map[string]string
	// BootIDPath identifies the current boot (default /proc/sys/kernel/random/boot_id).
	BootIDPath string
}

// Vars names the bootloader variables. Empty fields take the defaults in Scheme's comment.
type Vars struct {
	Slot       string
	Upgrade    string
	BootCount  string
	BootLimit  string
	TrialSlot  string
	RejectBoot string
}

func (s *Scheme) setDefaults() error {
	if s.BootLimit == 0 {
		s.BootLimit = 3
	}
	if s.BootLimit < 1 {
		return fmt.Errorf("boot limit %d, want >= 1", s.BootLimit)
	}
	def := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	def(&s.Vars.Slot, "boot_part")
	def(&s.Vars.Upgrade, "upgrade_available")
	def(&s.Vars.BootCount, "bootcount")
	def(&s.Vars.BootLimit, "bootlimit")
	def(&s.Vars.TrialSlot, "ota_trial_slot")
	def(&s.Vars.RejectBoot, "ota_reject_boot")
	def(&s.CmdlinePath, "/proc/cmdline")
	def(&s.BootIDPath, "/proc/sys/kernel/random/boot_id")
	for _, n := range []string{s.Vars.Slot, s.Vars.Upgrade, s.Vars.BootCount, s.Vars.BootLimit, s.Vars.TrialSlot, s.Vars.RejectBoot} {
		if !validVarName(n) {
			return fmt.Errorf("invalid variable name %q", n)
		}
	}
	if s.SlotValues == nil {
		s.SlotValues = map[string]string{SlotA: SlotA, SlotB: SlotB}
	}
	if err := checkSlotMap("SlotValues", s.SlotValues); err != nil {
		return err
	}
	for _, v := range s.SlotValues {
		if !validVarValue(v) {
			return fmt.Errorf("SlotValues: invalid value %q", v)
		}
	}
	if s.CmdlineValues != nil {
		if err := checkSlotMap("CmdlineValues", s.CmdlineValues); err != nil {
			return err
		}
	}
	return nil
}

func checkSlotMap(name string, m map[string]string) error {
	if len(m) != 2 || m[SlotA] == "" || m[SlotB] == "" || m[SlotA] == m[SlotB] {
		return fmt.Errorf("%s must map %q and %q to two distinct non-empty values", name, SlotA, SlotB)
	}
	return nil
}

func validVarName(n string) bool {
	return n != "" && !strings.ContainsAny(n, "= \t\r\n\x00#")
}

func validVarValue(v string) bool { return !strings.ContainsAny(v, "\r\n\x00") }

// envStore reads and atomically updates a bootloader environment. A variable set to ""
// is deleted (or left empty where the tool cannot delete in the same update).
type envStore interface {
	read(ctx context.Context) (map[string]string, error)
	write(ctx context.Context, vars map[string]string) error
}

// envBackend is the Backend over an envStore with Scheme's logic.
type envBackend struct {
	name  string
	s     Scheme
	store envStore
	log   hclog.Logger
	mu    sync.Mutex // read-modify-write of the environment
}

func (b *envBackend) Name() string { return b.name }

func (b *envBackend) State(ctx context.Context) (State, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st, _, err := b.state(ctx)
	return st, err
}

func (b *envBackend) slotOf(v string) (string, bool) {
	for slot, sv := range b.s.SlotValues {
		if sv == v {
			return slot, true
		}
	}
	return "", false
}

// state derives State from the environment and the booted-slot source.
func (b *envBackend) state(ctx context.Context) (State, map[string]string, error) {
	env, err := b.store.read(ctx)
	if err != nil {
		return State{}, nil, err
	}
	v := b.s.Vars
	var st State
	part := ""
	if raw := env[v.Slot]; raw != "" {
		p, ok := b.slotOf(raw)
		if !ok {
			return State{}, nil, controlErr("%s: %s=%q names no slot", b.name, v.Slot, raw)
		}
		part = p
	}
	upgrade := false
	switch env[v.Upgrade] {
	case "", "0":
	case "1":
		upgrade = true
	default:
		return State{}, nil, controlErr("%s: %s=%q, want 0 or 1", b.name, v.Upgrade, env[v.Upgrade])
	}
	if c := env[v.BootCount]; c != "" {
		n, err := strconv.Atoi(c)
		if err != nil || n < 0 {
			return State{}, nil, controlErr("%s: %s=%q is not a count", b.name, v.BootCount, c)
		}
		st.BootCount = n
	}
	trialSlot := ""
	if t := env[v.TrialSlot]; t != "" {
		if !ValidSlot(t) {
			return State{}, nil, controlErr("%s: %s=%q names no slot", b.name, v.TrialSlot, t)
		}
		trialSlot = t
	}

	booted := ""
	if b.s.CmdlineKey != "" {
		if booted, err = b.cmdlineSlot(); err != nil {
			return State{}, nil, err
		}
	}
	if part == "" {
		if booted == "" || upgrade {
			return State{}, nil, controlErr("%s: variable %s is not set", b.name, v.Slot)
		}
		part = booted
	}
	if booted == "" {
		rb := env[v.RejectBoot]
		switch {
		case upgrade && st.BootCount == 0:
			booted = Other(part) // activated, the bootloader has not run since
		case !upgrade && trialSlot != "" && rb != "" && rb == b.bootID():
			booted = trialSlot // rejected in this boot: still running it
		default:
			booted = part
		}
	}
	st.Booted = booted
	if upgrade {
		if booted == part {
			st.Trial, st.Committed = true, Other(part)
		} else {
			st.Pending, st.Committed = part, booted
		}
	} else {
		st.Committed = part
		st.RolledBack = trialSlot != ""
	}
	return st, env, nil
}

// cmdlineSlot reads the running slot from the kernel command line. The parameter given twice
// with different values is refused: which one counts depends on who reads it (the kernel takes
// the last root=, a script may take the first), and a wrong guess would write the running slot.
func (b *envBackend) cmdlineSlot() (string, error) {
	raw, err := os.ReadFile(b.s.CmdlinePath)
	if err != nil {
		return "", controlErr("%s: booted slot: %w", b.name, err)
	}
	val, found := "", false
	for _, f := range strings.Fields(string(raw)) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || k != b.s.CmdlineKey {
			continue
		}
		if found && v != val {
			return "", controlErr("%s: kernel parameter %s given twice, %q and %q: the running slot is ambiguous", b.name, k, val, v)
		}
		val, found = v, true
	}
	if !found {
		return "", controlErr("%s: kernel parameter %s not in %s", b.name, b.s.CmdlineKey, b.s.CmdlinePath)
	}
	if b.s.CmdlineValues == nil {
		if s := strings.ToLower(val); ValidSlot(s) {
			return s, nil
		}
	}
	for slot, want := range b.s.CmdlineValues {
		if val == want {
			return slot, nil
		}
	}
	return "", controlErr("%s: kernel parameter %s=%q names no slot", b.name, b.s.CmdlineKey, val)
}

// bootID is the current boot's id, "" when unavailable (then a rejected slot shows as
// rolled back right away when the booted slot comes from the environment).
func (b *envBackend) bootID() string {
	raw, err := os.ReadFile(b.s.BootIDPath)
	if err != nil {
		return ""
	}
	id := strings.TrimSpace(string(raw))
	if !validVarValue(id) || strings.ContainsAny(id, " \t") {
		return ""
	}
	return id
}

func (b *envBackend) Activate(ctx context.Context, slot string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	st, _, err := b.state(ctx)
	if err != nil {
		return err
	}
	if err := checkActivate(st, slot); err != nil {
		return err
	}
	v := b.s.Vars
	if err := b.store.write(ctx, map[string]string{
		v.Slot:       b.s.SlotValues[slot],
		v.Upgrade:    "1",
		v.BootCount:  "0",
		v.BootLimit:  strconv.Itoa(b.s.BootLimit),
		v.TrialSlot:  slot,
		v.RejectBoot: "",
	}); err != nil {
		return err
	}
	b.log.Info("slot activated for the next boot", "slot", slot, "boot_limit", b.s.BootLimit)
	return nil
}

func (b *envBackend) Commit(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	st, _, err := b.state(ctx)
	if err != nil {
		return err
	}
	if !st.Trial {
		return badState("commit: slot %s is not on trial", st.Booted)
	}
	v := b.s.Vars
	if err := b.store.write(ctx, map[string]string{
		v.Upgrade:    "0",
		v.BootCount:  "0",
		v.TrialSlot:  "",
		v.RejectBoot: "",
	}); err != nil {
		return status.Errorf(otav1.Reason_REASON_COMMIT_FAILED, "commit slot %s: %w", st.Booted, err)
	}
	// Read back: a tool that exits 0 without storing (read-only env, wrong config) must not
	// make a commit look done.
	after, _, err := b.state(ctx)
	if err != nil {
		return status.Errorf(otav1.Reason_REASON_COMMIT_FAILED, "commit slot %s: read back: %w", st.Booted, err)
	}
	if after.Trial || after.Committed != st.Booted {
		return status.Errorf(otav1.Reason_REASON_COMMIT_FAILED, "commit slot %s: environment still says trial=%t committed=%s", st.Booted, after.Trial, after.Committed)
	}
	b.log.Info("slot committed", "slot", st.Booted)
	return nil
}

func (b *envBackend) Reject(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	st, _, err := b.state(ctx)
	if err != nil {
		return err
	}
	v := b.s.Vars
	set := map[string]string{v.Slot: b.s.SlotValues[st.Committed], v.Upgrade: "0"}
	rejected := st.Booted
	switch {
	case st.Trial:
		set[v.RejectBoot] = b.bootID()
	case st.Pending != "":
		set[v.BootCount] = "0"
		rejected = st.Pending
	default:
		return badState("reject: no trial and no activated slot")
	}
	if err := b.store.write(ctx, set); err != nil {
		return err
	}
	b.log.Warn("update rejected, next boot runs the committed slot", "rejected", rejected, "committed", st.Committed)
	return nil
}

// run executes a tool and returns its stdout; failures carry the tool's stderr.
func run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &capped{max: 4096, buf: &stderr}
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
			msg = "not installed"
		}
		return nil, controlErr("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return stdout.Bytes(), nil
}

// capped keeps the first max bytes written to it and discards the rest.
type capped struct {
	max int
	buf *bytes.Buffer
}

func (c *capped) Write(p []byte) (int, error) {
	if room := c.max - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}

// parseEnv reads "name=value" lines (fw_printenv, grub-editenv list).
func parseEnv(out []byte) map[string]string {
	env := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && k != "" && !strings.HasPrefix(k, "#") {
			env[k] = v
		}
	}
	return env
}
