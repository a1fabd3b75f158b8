// Package ext collects the writer's status extension fields: key/value pairs that ota-net
// merges into every job update, so an operator sees the device's condition next to the
// update's outcome.
//
// Keys produced here (stable; board integrators and dashboards may rely on them):
//
//	uptime_s     seconds since boot, integer (/proc/uptime)
//	free_bytes   bytes available to the writer in the state directory (statfs f_bavail)
//	temp_c       hottest thermal zone in degrees Celsius, one decimal ("47.5")
//	             (<sys>/class/thermal/thermal_zone*/temp, millidegrees)
//	battery_pct  capacity of the first battery, integer 0..100
//	             (<sys>/class/power_supply/*/capacity where type is "Battery")
//	<static>     every Config.Static pair
//	<command>    every key=value line printed by a Config.Commands provider
//
// A source that is absent (no thermal zone, no battery) or fails contributes nothing.
// Precedence on equal keys: static config > command providers (a later one wins) > the
// writer's own fields (firmware_version, boot_slot, ..., passed to Collect) > built-in
// sources. The statusDetails base keys (self_test, progress, reason, error_code) are never
// produced.
//
// Order: the statusDetails budget is 10 pairs, and what is left after the agent's own keys
// goes to the fields in the order Collect returns them: what the operator configured first
// (static pairs in configuration order, then each provider's lines in provider order), then
// the writer's own fields, then the built-in sources.
//
// Every key satisfies status.ValidKey and every value is cleaned with status.CleanValue:
// nothing collected here can make AWS reject a job update.
package ext

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/internal/proc"
)

// Stable keys of the built-in sources.
const (
	KeyUptime  = "uptime_s"
	KeyFree    = "free_bytes"
	KeyTemp    = "temp_c"
	KeyBattery = "battery_pct"
)

// Defaults for executable providers.
const (
	DefaultTimeout   = 5 * time.Second
	DefaultMaxOutput = 4096
)

// Command is an executable provider: it prints key=value lines on stdout.
type Command struct {
	Name    string
	Argv    []string
	Timeout time.Duration // default DefaultTimeout
}

// Config of the collector.
type Config struct {
	// Static pairs, in the order of the configuration file.
	Static   status.Fields
	Commands []Command
	// StateDir is measured for free_bytes; "" leaves free_bytes out.
	StateDir string
	// SysRoot is the sysfs mount (default /sys); ProcRoot the procfs mount (default /proc).
	SysRoot, ProcRoot string
	// MaxOutput caps each provider's stdout in bytes (default DefaultMaxOutput); a provider
	// that prints more is skipped.
	MaxOutput int
}

// Collector gathers the extension fields. Safe for concurrent use.
type Collector struct {
	cfg    Config
	static status.Fields
	cmds   []Command
	log    hclog.Logger
}

// reserved are statusDetails base keys: the agent's own fields win anyway, so producing them
// would only waste the 10-pair budget.
var reserved = []string{status.KeySelfTest, status.KeyProgress, status.KeyReason, status.KeyErrorCode}

func usableKey(k string) bool { return status.ValidKey(k) && !slices.Contains(reserved, k) }

// New checks cfg: invalid static pairs and unusable commands are logged and dropped, so a
// configuration mistake costs a field, not the writer.
func New(cfg Config, log hclog.Logger) *Collector {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	log = log.Named("ext")
	if cfg.SysRoot == "" {
		cfg.SysRoot = "/sys"
	}
	if cfg.ProcRoot == "" {
		cfg.ProcRoot = "/proc"
	}
	if cfg.MaxOutput <= 0 {
		cfg.MaxOutput = DefaultMaxOutput
	}
	c := &Collector{cfg: cfg, log: log}
	for _, f := range cfg.Static {
		cv, ok := status.CleanValue(f.Value)
		if !usableKey(f.Key) || !ok {
			log.Warn("static extension field dropped: key must be 1..128 of [a-zA-Z0-9:_-] and not reserved, value printable", "key", f.Key)
			continue
		}
		if _, dup := c.static.Get(f.Key); dup {
			continue
		}
		c.static = append(c.static, status.Field{Key: f.Key, Value: cv})
	}
	for i, cmd := range cfg.Commands {
		if cmd.Name == "" {
			cmd.Name = "command-" + strconv.Itoa(i)
		}
		if len(cmd.Argv) == 0 || cmd.Argv[0] == "" {
			log.Warn("extension provider dropped: empty argv", "provider", cmd.Name)
			continue
		}
		if cmd.Timeout <= 0 {
			cmd.Timeout = DefaultTimeout
		}
		c.cmds = append(c.cmds, cmd)
	}
	return c
}

// Collect returns the current fields in budget order (see the package comment), own being
// the writer's own fields. It never fails: a failing source is logged and left out. It
// returns within the longest provider timeout (providers run in parallel), or sooner when
// ctx ends.
func (c *Collector) Collect(ctx context.Context, own status.Fields) status.Fields {
	var builtin status.Fields
	put := func(k, v string) {
		if cv, ok := status.CleanValue(v); ok && usableKey(k) {
			builtin = append(builtin, status.Field{Key: k, Value: cv})
		}
	}
	if v, ok := c.uptime(); ok {
		put(KeyUptime, v)
	}
	if v, ok := c.free(); ok {
		put(KeyFree, v)
	}
	if v, ok := c.temperature(); ok {
		put(KeyTemp, v)
	}
	if v, ok := c.battery(); ok {
		put(KeyBattery, v)
	}

	results := make([]status.Fields, len(c.cmds))
	var wg sync.WaitGroup
	for i, cmd := range c.cmds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = c.runProvider(ctx, cmd)
		}()
	}
	wg.Wait()

	// Every candidate in budget order, ranked by precedence; each key keeps the candidate of
	// the highest rank, at that candidate's place.
	type cand struct {
		f    status.Field
		rank int
	}
	var all []cand
	for _, f := range c.static {
		all = append(all, cand{f, len(results) + 2})
	}
	for i, r := range results { // config order: a later provider wins
		for _, f := range r {
			all = append(all, cand{f, i + 2})
		}
	}
	for _, f := range own {
		if cv, ok := status.CleanValue(f.Value); ok && usableKey(f.Key) {
			all = append(all, cand{status.Field{Key: f.Key, Value: cv}, 1})
		}
	}
	for _, f := range builtin {
		all = append(all, cand{f, 0})
	}
	best := map[string]int{}
	for _, x := range all {
		if r, seen := best[x.f.Key]; !seen || x.rank > r {
			best[x.f.Key] = x.rank
		}
	}
	out := status.Fields{}
	for _, x := range all {
		if r, ok := best[x.f.Key]; ok && r == x.rank {
			out = append(out, x.f)
			delete(best, x.f.Key)
		}
	}
	return out
}

// runProvider runs one provider and returns its validated fields in line order, nil when it
// failed.
func (c *Collector) runProvider(ctx context.Context, cmd Command) status.Fields {
	log := c.log.With("provider", cmd.Name)
	r := proc.Run(ctx, cmd.Argv, proc.Options{Timeout: cmd.Timeout, MaxOutput: c.cfg.MaxOutput})
	if r.Err != nil {
		log.Warn("extension provider failed, skipped", "error", r.Err, "stderr", lastLine(r.Stderr), "duration", r.Duration)
		return nil
	}
	if r.Truncated {
		log.Warn("extension provider printed too much, skipped", "max_bytes", c.cfg.MaxOutput)
		return nil
	}
	fields, bad := parseLines(r.Stdout)
	if bad > 0 {
		log.Warn("extension provider printed invalid lines, ignored them", "invalid_lines", bad, "valid_fields", len(fields))
	}
	return fields
}

// parseLines reads key=value lines in order (a repeated key keeps its first place and its
// last value). Blank lines and lines starting with # are ignored; other lines without a
// usable key or a printable value count as bad.
func parseLines(b []byte) (status.Fields, int) {
	fields := status.Fields{}
	at := map[string]int{}
	bad := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), len(b)+1)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		k = strings.TrimSpace(k)
		cv, vok := status.CleanValue(v)
		if !ok || !usableKey(k) || !vok {
			bad++
			continue
		}
		if i, dup := at[k]; dup {
			fields[i].Value = cv
			continue
		}
		at[k] = len(fields)
		fields = append(fields, status.Field{Key: k, Value: cv})
	}
	return fields, bad
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	v, _ := status.CleanValue(s)
	return v
}

func (c *Collector) uptime() (string, bool) {
	b, err := os.ReadFile(filepath.Join(c.cfg.ProcRoot, "uptime"))
	if err != nil {
		return "", false
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "", false
	}
	secs, err := strconv.ParseFloat(f[0], 64)
	if err != nil || secs < 0 {
		return "", false
	}
	return strconv.FormatInt(int64(secs), 10), true
}

func (c *Collector) free() (string, bool) {
	if c.cfg.StateDir == "" {
		return "", false
	}
	var st unix.Statfs_t
	if err := unix.Statfs(c.cfg.StateDir, &st); err != nil {
		c.log.Debug("statfs of the state directory failed", "dir", c.cfg.StateDir, "error", err)
		return "", false
	}
	return strconv.FormatUint(st.Bavail*uint64(st.Bsize), 10), true
}

// temperature is the hottest zone: the one an operator needs to see.
func (c *Collector) temperature() (string, bool) {
	zones, _ := filepath.Glob(filepath.Join(c.cfg.SysRoot, "class", "thermal", "thermal_zone*", "temp"))
	best, found := int64(0), false
	for _, z := range zones {
		n, ok := readInt(z)
		if !ok {
			continue
		}
		if !found || n > best {
			best, found = n, true
		}
	}
	if !found {
		return "", false
	}
	return formatMilli(best), true
}

// formatMilli renders millidegrees with one decimal, without float rounding surprises.
func formatMilli(m int64) string {
	sign := ""
	if m < 0 {
		sign, m = "-", -m
	}
	tenths := (m + 50) / 100
	return fmt.Sprintf("%s%d.%d", sign, tenths/10, tenths%10)
}

func (c *Collector) battery() (string, bool) {
	caps, _ := filepath.Glob(filepath.Join(c.cfg.SysRoot, "class", "power_supply", "*", "capacity"))
	sort.Strings(caps)
	for _, p := range caps {
		if t, err := os.ReadFile(filepath.Join(filepath.Dir(p), "type")); err == nil && strings.TrimSpace(string(t)) != "Battery" {
			continue
		}
		if n, ok := readInt(p); ok && n >= 0 && n <= 100 {
			return strconv.FormatInt(n, 10), true
		}
	}
	return "", false
}

func readInt(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil
}
