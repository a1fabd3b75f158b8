package ext

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	"github.com/gwota/gwota/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// fakeSys builds a sysfs/procfs tree with two thermal zones (one unreadable garbage), a
// mains supply and a battery.
func fakeSys(t *testing.T) (sys, procRoot string) {
	root := t.TempDir()
	sys, procRoot = filepath.Join(root, "sys"), filepath.Join(root, "proc")
	write(t, filepath.Join(sys, "class/thermal/thermal_zone0/temp"), "47500\n")
	write(t, filepath.Join(sys, "class/thermal/thermal_zone1/temp"), "51234\n")
	write(t, filepath.Join(sys, "class/thermal/thermal_zone2/temp"), "n/a\n")
	write(t, filepath.Join(sys, "class/power_supply/AC/type"), "Mains\n")
	write(t, filepath.Join(sys, "class/power_supply/AC/capacity"), "100\n")
	write(t, filepath.Join(sys, "class/power_supply/BAT0/type"), "Battery\n")
	write(t, filepath.Join(sys, "class/power_supply/BAT0/capacity"), "87\n")
	write(t, filepath.Join(procRoot, "uptime"), "12345.67 23456.78\n")
	return sys, procRoot
}

func logger(t *testing.T) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Warn})
}

func sh(name, script string, timeout time.Duration) Command {
	return Command{Name: name, Argv: []string{"sh", "-c", script}, Timeout: timeout}
}

func TestCollect(t *testing.T) {
	sys, procRoot := fakeSys(t)
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "slow.pid")
	collect := func(slow time.Duration) map[string]string {
		return New(Config{
			Static: status.Pairs(
				"site", "north\tgate", // cleaned
				"bad key!", "x", // invalid key: dropped
				"reason", "not allowed", // reserved: dropped
				"empty", "\x00\x01", // nothing printable: dropped
				"fw_channel", "stable", // also printed by a provider: static wins
			),
			Commands: []Command{
				sh("good", "printf 'model=gw-100\\n# comment\\n\\nserial = SN42 \\ntemp_c=99.9\\nfw_channel=beta\\n'", 0),
				sh("garbage", "printf 'no equals sign\\nbad key=1\\nok_key=\\001\\002\\nfine=yes\\nprogress=1/2\\n'; head -c 64 /dev/urandom", 0),
				sh("fails", "echo failed_key=1; echo broken >&2; exit 3", 0),
				sh("slow", "echo slow_key=1; echo $$ > "+pidFile+"; exec sleep 300", slow),
				sh("chatty", "i=0; while [ $i -lt 2000 ]; do echo spam=1; i=$((i+1)); done", 0), // over MaxOutput
				{Name: "empty argv"},
				{Name: "missing", Argv: []string{"/nonexistent/provider"}},
			},
			StateDir: dir,
			SysRoot:  sys,
			ProcRoot: procRoot,
		}, logger(t)).Collect(context.Background(), nil).Map()
	}
	// The slow provider's timeout must hit after its shell wrote its pid, which a loaded
	// machine does not promise within any fixed time: start at 300 ms and double, up to
	// 19.2 s, while it did not.
	var got map[string]string
	var pid int
	for limit := 300 * time.Millisecond; ; limit *= 2 {
		os.Remove(pidFile)
		got = collect(limit)
		b, err := os.ReadFile(pidFile)
		if pid, _ = strconv.Atoi(strings.TrimSpace(string(b))); pid > 0 {
			break
		}
		if limit >= 19200*time.Millisecond {
			t.Fatalf("slow provider never wrote its pid: %q, %v", b, err)
		}
		t.Logf("slow provider killed at %v before it wrote its pid; again with a longer timeout", limit)
	}

	free, err := strconv.ParseUint(got[KeyFree], 10, 64)
	if err != nil || free == 0 {
		t.Errorf("free_bytes %q: want a positive integer", got[KeyFree])
	}
	delete(got, KeyFree)
	want := map[string]string{
		KeyUptime:    "12345",
		KeyTemp:      "99.9", // provider overrides the built-in 51.2
		KeyBattery:   "87",
		"site":       "north gate",
		"fw_channel": "stable",
		"model":      "gw-100",
		"serial":     "SN42",
		"fine":       "yes",
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Collect (-want +got):\n%s", d)
	}
	if err := status.Validate(status.Build(status.Base{}, status.SortedFields(got))); err != nil {
		t.Errorf("collected fields break the AWS limits: %v", err)
	}

	// The slow provider was killed at its deadline, not left running.
	if st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
		if f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:])); len(f) > 0 && f[0] != "Z" {
			t.Errorf("slow provider pid %d still running (state %s)", pid, f[0])
		}
	}
}

func TestBuiltinSources(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		want  map[string]string
	}{
		{"nothing present", nil, map[string]string{}},
		{"one zone", map[string]string{"sys/class/thermal/thermal_zone0/temp": "47500"}, map[string]string{KeyTemp: "47.5"}},
		{"rounding", map[string]string{"sys/class/thermal/thermal_zone0/temp": "47449"}, map[string]string{KeyTemp: "47.4"}},
		{"below zero", map[string]string{"sys/class/thermal/thermal_zone0/temp": "-1500"}, map[string]string{KeyTemp: "-1.5"}},
		{"battery without type file", map[string]string{"sys/class/power_supply/bq27/capacity": "5"}, map[string]string{KeyBattery: "5"}},
		{"battery out of range", map[string]string{"sys/class/power_supply/BAT0/capacity": "140"}, map[string]string{}},
		{"uptime garbage", map[string]string{"proc/uptime": "soon"}, map[string]string{}},
		{"uptime", map[string]string{"proc/uptime": "0.99 1.0"}, map[string]string{KeyUptime: "0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for p, s := range tt.files {
				write(t, filepath.Join(root, p), s)
			}
			c := New(Config{SysRoot: filepath.Join(root, "sys"), ProcRoot: filepath.Join(root, "proc")}, nil)
			if d := cmp.Diff(tt.want, c.Collect(context.Background(), nil).Map()); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}

func TestStateDirMissing(t *testing.T) {
	root := t.TempDir()
	c := New(Config{StateDir: filepath.Join(root, "gone"), SysRoot: root, ProcRoot: root}, nil)
	if got := c.Collect(context.Background(), nil); len(got) != 0 {
		t.Errorf("got %v, want nothing", got)
	}
}

// Collect ends with the caller's ctx even when a provider's own deadline is far away.
func TestCollectHonoursContext(t *testing.T) {
	root := t.TempDir()
	c := New(Config{SysRoot: root, ProcRoot: root, Commands: []Command{sh("slow", "echo k=v; exec sleep 300", time.Hour)}}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if got := c.Collect(ctx, nil); len(got) != 0 {
		t.Errorf("got %v from a provider that was cut off", got)
	}
	if ctx.Err() == nil {
		t.Error("Collect returned before the provider was cut off")
	}
}

func TestParseLines(t *testing.T) {
	tests := []struct {
		in      string
		want    status.Fields
		wantBad int
	}{
		{"b=1\na=2\n", status.Pairs("b", "1", "a", "2"), 0},
		{"a=x=y", status.Pairs("a", "x=y"), 0},
		{"=v\nk=\n", status.Fields{}, 2},
		{"k=" + strings.Repeat("v", 2000), status.Pairs("k", strings.Repeat("v", status.MaxValueLen)), 0},
		{strings.Repeat("k", 129) + "=v", status.Fields{}, 1},
		{"\xff\xfe=1\nk=\xff1", status.Pairs("k", "1"), 1},
		{"error_code=7\nself_test=x", status.Fields{}, 2},
		{"a=1\nb=2\na=3", status.Pairs("a", "3", "b", "2"), 0},
	}
	for _, tt := range tests {
		got, bad := parseLines([]byte(tt.in))
		if d := cmp.Diff(tt.want, got); d != "" || bad != tt.wantBad {
			t.Errorf("%q: bad=%d want %d, (-want +got):\n%s", tt.in, bad, tt.wantBad, d)
		}
	}
}

// Collect returns the fields in budget order: static pairs in configuration order, then the
// providers' lines in provider and line order, then the writer's own fields, then the
// built-in sources; each key once, where its winning value comes from.
func TestCollectOrder(t *testing.T) {
	sys, procRoot := fakeSys(t)
	c := New(Config{
		Static: status.Pairs("zz_site", "north", "aa_rack", "7", "mm_model", "static"),
		Commands: []Command{
			sh("first", "printf 'p1_b=1\\np1_a=2\\nshared=first\\nmm_model=provider\\n'", 0),
			sh("second", "printf 'shared=second\\ntemp_c=99.9\\n'", 0),
		},
		SysRoot: sys, ProcRoot: procRoot,
	}, logger(t))
	own := status.Pairs("firmware_version", "4.2.0", "boot_slot", "b", "zz_site", "own loses")
	got := c.Collect(context.Background(), own)
	want := status.Pairs(
		"zz_site", "north", "aa_rack", "7", "mm_model", "static", // static, in config order
		"p1_b", "1", "p1_a", "2", // first provider, line order
		"shared", "second", "temp_c", "99.9", // a later provider wins, and over a built-in
		"firmware_version", "4.2.0", "boot_slot", "b", // the writer's own
		KeyUptime, "12345", KeyBattery, "87", // built-in sources
	)
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Collect order (-want +got):\n%s", d)
	}
}
