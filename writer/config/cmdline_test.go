package config

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// The running-slot source: [boot] slot_from_cmdline and cmdline_slot_values, parsed for the
// environment backends and refused strictly otherwise.
func TestSlotFromCmdline(t *testing.T) {
	const uboot = "[boot]\nbackend = \"uboot\"\n"
	const grub = "[boot]\nbackend = \"grub\"\n"
	for _, tc := range []struct {
		name       string
		boot       string
		wantKey    string
		wantValues map[string]string
		wantErr    string
	}{
		{"not set: from the environment", uboot, "", nil, ""},
		{"key with default values", uboot + "slot_from_cmdline = \"rauc.slot\"\n", "rauc.slot", nil, ""},
		{"key with values, inline table", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"/dev/mmcblk0p2\", b = \"/dev/mmcblk0p3\" }\n",
			"root", map[string]string{"a": "/dev/mmcblk0p2", "b": "/dev/mmcblk0p3"}, ""},
		{"key with values, sub-table", grub + "slot_from_cmdline = \"root\"\n[boot.cmdline_slot_values]\na = \"PARTLABEL=rootfs-a\"\nb = \"PARTLABEL=rootfs-b\"\n",
			"root", map[string]string{"a": "PARTLABEL=rootfs-a", "b": "PARTLABEL=rootfs-b"}, ""},

		{"file backend", "[boot]\nbackend = \"file\"\nslot_from_cmdline = \"rauc.slot\"\n", "", nil, `slot_from_cmdline: not for backend "file"`},
		{"values without key", uboot + "cmdline_slot_values = { a = \"A\", b = \"B\" }\n", "", nil, "cmdline_slot_values: set without boot.slot_from_cmdline"},
		{"key with =", uboot + "slot_from_cmdline = \"root=\"\n", "", nil, `"root=" is not a kernel parameter name`},
		{"key with space", uboot + "slot_from_cmdline = \"rauc slot\"\n", "", nil, "is not a kernel parameter name"},
		{"empty values table", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = {}\n", "", nil, "must give the value of both slots"},
		{"one value", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"x\" }\n", "", nil, "must give the value of both slots"},
		{"unknown slot", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"x\", b = \"y\", c = \"z\" }\n", "", nil, `key "c" is not a slot`},
		{"upper-case slot name", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { A = \"x\", b = \"y\" }\n", "", nil, `key "A" is not a slot`},
		{"same value", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"x\", b = \"x\" }\n", "", nil, "a and b are both \"x\""},
		{"empty value", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"\", b = \"y\" }\n", "", nil, "cmdline_slot_values.a"},
		{"value with space", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"x\", b = \"y z\" }\n", "", nil, "cmdline_slot_values.b"},
		{"value with quote", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"\\\"x\\\"\", b = \"y\" }\n", "", nil, "cmdline_slot_values.a"},
		{"value with no-break space", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"x\u00a0\", b = \"y\" }\n", "", nil, "cmdline_slot_values.a"},
		{"value not a string", uboot + "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = 2, b = 3 }\n", "", nil, "cmdline_slot_values"},
		{"misspelt key", uboot + "slot_from_cmdln = \"root\"\n", "", nil, "unknown keys: boot.slot_from_cmdln"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(minimal + tc.boot))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Parse error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Boot.SlotFromCmdline != tc.wantKey {
				t.Errorf("slot_from_cmdline %q, want %q", c.Boot.SlotFromCmdline, tc.wantKey)
			}
			if d := cmp.Diff(tc.wantValues, c.Boot.CmdlineSlotValues); d != "" {
				t.Errorf("cmdline_slot_values (-want +got):\n%s", d)
			}
		})
	}
}
