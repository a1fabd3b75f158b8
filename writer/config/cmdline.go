package config

import (
	"maps"
	"regexp"
	"slices"
	"strings"
	"unicode"
)

// cmdlineKeyRE: a kernel parameter name as bootloaders write them (rauc.slot, root,
// systemd.verity_root_data, ...).
var cmdlineKeyRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`)

// validateCmdline checks the running-slot source. The kernel command line is what the
// bootloader really booted, so it is the production setting; the keys are refused with the
// file backend (which tracks the running slot itself) and anything that could never match a
// command line word is refused rather than left to fail at the first State.
func (b Boot) validateCmdline(bad func(string, ...any)) {
	if b.SlotFromCmdline == "" {
		if b.CmdlineSlotValues != nil {
			bad("boot.cmdline_slot_values: set without boot.slot_from_cmdline")
		}
		return
	}
	if b.Backend == BootFile {
		bad("boot.slot_from_cmdline: not for backend %q, which keeps the running slot itself", b.Backend)
	}
	if !cmdlineKeyRE.MatchString(b.SlotFromCmdline) {
		bad("boot.slot_from_cmdline: %q is not a kernel parameter name (1..64 of [A-Za-z0-9_.-])", b.SlotFromCmdline)
	}
	if b.CmdlineSlotValues == nil {
		return // "a"/"b" in either case
	}
	for _, k := range slices.Sorted(maps.Keys(b.CmdlineSlotValues)) {
		if k != "a" && k != "b" {
			bad("boot.cmdline_slot_values: key %q is not a slot (a, b)", k)
		}
	}
	va, oka := b.CmdlineSlotValues["a"]
	vb, okb := b.CmdlineSlotValues["b"]
	if !oka || !okb {
		bad("boot.cmdline_slot_values: must give the value of both slots, a and b")
	}
	for _, slot := range []string{"a", "b"} {
		v, ok := b.CmdlineSlotValues[slot]
		if !ok {
			continue
		}
		// The command line is split at white space, and quotes are not parsed: such a value
		// could never match.
		if v == "" || strings.ContainsFunc(v, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) || r == '"' }) {
			bad("boot.cmdline_slot_values.%s: %q must be non-empty, without white space, control characters or quotes", slot, v)
		}
	}
	if oka && okb && va == vb {
		bad("boot.cmdline_slot_values: a and b are both %q: the running slot would be ambiguous", va)
	}
}
