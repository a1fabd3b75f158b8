// Package boot is the writer's boot control: which A/B slot runs, which one boots next, and
// the trial/commit/rollback cycle. Backends: a JSON file that simulates the bootloader (File),
// the U-Boot environment through fw_printenv/fw_setenv (UBoot), and the GRUB environment
// through grub-editenv (GRUB).
//
// Errors are *status.Error: REASON_BAD_IMAGE_STATE for a transition that is not allowed now,
// REASON_COMMIT_FAILED when a commit could not be made permanent, REASON_STORAGE_FULL when
// the state storage is out of space, REASON_BOOT_CONTROL_FAILED when a tool, the environment
// or the state storage fails otherwise (the tool's stderr is in the message).
package boot

import (
	"context"
	"errors"
	"syscall"

	"github.com/hashicorp/go-hclog"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Slot names.
const (
	SlotA = "a"
	SlotB = "b"
)

// State is the boot state as the bootloader sees it.
type State struct {
	Booted     string // slot running now: "a" or "b"
	Committed  string // slot that boots when no trial is pending
	Pending    string // slot activated for the next boot, "" when none (image state ACTIVATED)
	Trial      bool   // running Booted on trial, not yet committed (image state TRIAL)
	RolledBack bool   // the last trial failed or was rejected (image state ROLLED_BACK)
	BootCount  int
}

// ImageState maps s to the protocol's image state. Pending wins over Trial (a trial that was
// rejected and then re-activated is ACTIVATED), and a rollback shows until the next
// activation.
func (s State) ImageState() otav1.ImageState {
	switch {
	case s.Pending != "":
		return otav1.ImageState_IMAGE_STATE_ACTIVATED
	case s.Trial:
		return otav1.ImageState_IMAGE_STATE_TRIAL
	case s.RolledBack:
		return otav1.ImageState_IMAGE_STATE_ROLLED_BACK
	default:
		return otav1.ImageState_IMAGE_STATE_NORMAL
	}
}

// Backend controls the bootloader. Implementations are safe for concurrent use.
type Backend interface {
	Name() string
	State(ctx context.Context) (State, error)
	Activate(ctx context.Context, slot string) error // next boot tries slot
	Commit(ctx context.Context) error                // make the trial slot permanent
	Reject(ctx context.Context) error                // roll back: next boot runs the committed slot
}

// Other returns the other slot of the pair ("" for an unknown slot).
func Other(slot string) string {
	switch slot {
	case SlotA:
		return SlotB
	case SlotB:
		return SlotA
	}
	return ""
}

// ValidSlot reports whether slot is "a" or "b".
func ValidSlot(slot string) bool { return slot == SlotA || slot == SlotB }

// controlErr types a failure of the boot control itself. Out of space (ENOSPC, EDQUOT) is
// REASON_STORAGE_FULL, which the operator repairs by freeing space; anything else is
// REASON_BOOT_CONTROL_FAILED.
func controlErr(format string, args ...any) *status.Error {
	e := status.Errorf(otav1.Reason_REASON_BOOT_CONTROL_FAILED, format, args...)
	if errors.Is(e.Err, syscall.ENOSPC) || errors.Is(e.Err, syscall.EDQUOT) {
		e.Reason = otav1.Reason_REASON_STORAGE_FULL
	}
	return e
}

func badState(format string, args ...any) error {
	return status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, format, args...)
}

// checkActivate is the rule every backend applies before activating slot: no trial may be
// open (commit or reject it first), the running slot cannot be activated, and after a
// rollback the device must have rebooted into the committed slot first.
func checkActivate(st State, slot string) error {
	switch {
	case !ValidSlot(slot):
		return badState("activate: unknown slot %q", slot)
	case st.Trial:
		return badState("activate %s: slot %s is on trial, commit or reject it first", slot, st.Booted)
	case slot == st.Booted:
		return badState("activate %s: it is the running slot", slot)
	case st.Booted != st.Committed:
		return badState("activate %s: running slot %s is not the committed slot %s, reboot first", slot, st.Booted, st.Committed)
	}
	return nil
}

// named is the backends' logger: log (nil: none) under the name "boot".
func named(log hclog.Logger) hclog.Logger {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return log.Named("boot")
}
