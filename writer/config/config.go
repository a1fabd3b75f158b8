// Package config loads and validates the writer's TOML configuration. All policy lives here:
// which targets exist and what backs them, which keys are trusted, size limits, the version
// policy. Nothing a client sends can widen it.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/gwota/gwota/status"
)

// Defaults applied by Load/Parse when a key is absent.
const (
	DefaultSocket          = "/run/ota/writer.sock"
	DefaultStateDir        = "/var/lib/ota-writer"
	DefaultMaxBlockSize    = 131072
	MinBlockSize           = 256
	MaxMaxBlockSize        = 4 << 20
	DefaultSyncBytes       = 8 << 20
	DefaultSyncInterval    = 2 * time.Second
	DefaultSelfTestTimeout = 5 * time.Minute
	DefaultBootLimit       = 3
	DefaultCommandTimeout  = 10 * time.Second
	// DefaultFreeSpaceReserve is what a growable (regular-file) medium leaves free on its
	// filesystem: the journal and the system keep working when an image fills the rest.
	DefaultFreeSpaceReserve = 32 << 20
	// MaxCompatibleLen is the longest compatible string (a manifest's limit too).
	MaxCompatibleLen = 256
)

// Version policies.
const (
	VersionAny     = "any"
	VersionNewer   = "newer"
	VersionNotSame = "not_same"
)

// Target kinds.
const (
	KindAB   = "ab"
	KindFile = "file"
)

// Boot backends.
const (
	BootFile  = "file"
	BootUBoot = "uboot"
	BootGRUB  = "grub"
)

// Config is the whole writer configuration.
type Config struct {
	Socket      string `toml:"socket"`
	SocketGroup string `toml:"socket_group"`
	StateDir    string `toml:"state_dir"`
	// PeerUIDs: uids allowed on the socket besides root. After Load/Parse it also holds the
	// uids of PeerUsers, so it is the whole allow list.
	PeerUIDs []int `toml:"peer_uids"`
	// PeerUsers: user names allowed like PeerUIDs, resolved at load: ota-net's uid is picked
	// at install time, so a shipped config can name the user but not know the number.
	PeerUsers []string `toml:"peer_users"`
	// TrustedKeys are PEM certificates or public keys; a job's certfile only selects among them.
	TrustedKeys []string `toml:"trusted_keys"`
	// AllowAnyTrustedKey lets a job that names no certfile be verified against every trusted
	// key. Default false: such a job is refused (untrusted_signer).
	AllowAnyTrustedKey bool     `toml:"allow_any_trusted_key"`
	AllowSHA1          bool     `toml:"allow_sha1"`
	RebootCommand      []string `toml:"reboot_command"`
	// MaxBlockSize is the largest block a session may use (bytes).
	MaxBlockSize uint32 `toml:"max_block_size"`
	// SyncBytes / SyncInterval: make written blocks durable (fdatasync + journal) after this
	// many bytes or this much time since the last sync, whichever comes first.
	SyncBytes    int64         `toml:"sync_bytes"`
	SyncInterval time.Duration `toml:"sync_interval"`
	// VersionPolicy: any | newer | not_same. AllowDowngrade relaxes "newer" to "not_same".
	VersionPolicy  string `toml:"version_policy"`
	AllowDowngrade bool   `toml:"allow_downgrade"`
	// AcceptUnsignedVersions lets policies newer and not_same compare the version a job
	// document declares for a plain image. That version is signed by nobody: whoever edits the
	// job document, or a compromised ota-net, picks it. Default false: only the signed version
	// of an update manifest is compared, and an image without one is refused (version_check).
	AcceptUnsignedVersions bool          `toml:"accept_unsigned_versions"`
	SelfTestTimeout        time.Duration `toml:"self_test_timeout"`
	LogLevel               string        `toml:"log_level"`
	LogJSON                bool          `toml:"log_json"`

	// FreeSpaceReserve: bytes a regular-file slot or a file target's temporary file must leave
	// free on its filesystem (nil: DefaultFreeSpaceReserve).
	FreeSpaceReserve *uint64 `toml:"free_space_reserve"`

	Boot              Boot              `toml:"boot"`
	Targets           []Target          `toml:"target"`
	Checks            []Command         `toml:"check"`
	Extensions        map[string]string `toml:"extensions"`
	ExtensionCommands []Command         `toml:"extension_command"`
	// ExtensionOrder is the order of the [extensions] keys in the file (Parse fills it): the
	// statusDetails budget goes to the fields in that order.
	ExtensionOrder []string `toml:"-"`
}

// Boot selects and configures the boot control backend.
type Boot struct {
	Backend string `toml:"backend"` // file | uboot | grub
	// BootLimit: boot attempts of a trial slot before the bootloader (or the file backend's
	// simulation) falls back to the committed slot.
	BootLimit int `toml:"boot_limit"`
	// U-Boot: fw_env.config path and the libubootenv tools.
	FwEnvConfig string `toml:"fw_env_config"`
	FwPrintenv  string `toml:"fw_printenv"`
	FwSetenv    string `toml:"fw_setenv"`
	// GRUB: environment block and the grub-editenv tool.
	GrubEnv     string `toml:"grub_env"`
	GrubEditenv string `toml:"grub_editenv"`
	// SlotFromCmdline (uboot, grub): the kernel command line parameter that names the
	// running slot ("rauc.slot", "root"); empty: the running slot is derived from the
	// bootloader environment. CmdlineSlotValues: the parameter's value for slot "a" and
	// slot "b"; absent: "a"/"b" in either case. See cmdline.go.
	SlotFromCmdline   string            `toml:"slot_from_cmdline"`
	CmdlineSlotValues map[string]string `toml:"cmdline_slot_values"`
	// BootIDFile (file backend): the file whose content identifies the current boot; the
	// simulated bootloader steps once per boot, not at every writer start. Default the
	// kernel's /proc/sys/kernel/random/boot_id.
	BootIDFile string `toml:"boot_id_file"`
}

// Target is one flash target: an A/B slot pair or a plain file.
type Target struct {
	Name string `toml:"name"`
	Kind string `toml:"kind"` // ab | file
	// FileTypes / FilePaths: job fileType / filepath values routed to this target.
	FileTypes []int32  `toml:"file_types"`
	FilePaths []string `toml:"file_paths"`
	// Slots: kind "ab", slot a then slot b (block devices, partitions or regular files).
	Slots []string `toml:"slots"`
	// Path: kind "file", the destination.
	Path string `toml:"path"`
	// MaxSize limits the image size in bytes (0: only the medium's capacity limits it; a
	// regular file is bounded by its filesystem's free space minus free_space_reserve).
	MaxSize uint64 `toml:"max_size"`
	// AllowWritableDir: kind "file", accept a destination directory (or one on its way) that
	// a user other than root can write. Such a user can swap the file between verification
	// and use, so this is off unless the operator says so.
	AllowWritableDir bool `toml:"allow_writable_dir"`
	// TrustedKeys, when set, are the only keys that verify this target's images (PEM paths,
	// like the global trusted_keys, which then do not apply to this target).
	TrustedKeys []string `toml:"trusted_keys"`
	// AllowAnyTrustedKey: like the global key, for this target only.
	AllowAnyTrustedKey bool `toml:"allow_any_trusted_key"`
	// Compatible is the board or product string an update manifest for this target must name
	// (docs/MANIFEST.md). Empty: manifests (delta updates) are refused for this target.
	Compatible string `toml:"compatible"`
}

// Command is a health check ([[check]]) or an executable extension provider
// ([[extension_command]]).
type Command struct {
	Name    string        `toml:"name"`
	Command []string      `toml:"command"`
	Timeout time.Duration `toml:"timeout"`
}

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
)

// Load reads and validates the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes TOML, refuses unknown keys, applies defaults and validates.
func Parse(data []byte) (*Config, error) {
	var c Config
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&c)
	if err != nil {
		return nil, err
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("unknown keys: %s", strings.Join(keys, ", "))
	}
	for _, k := range md.Keys() {
		// The decoder matches table names to fields ignoring case ([Extensions] fills
		// Extensions), so the order must be read the same way.
		if len(k) == 2 && strings.EqualFold(k[0], "extensions") {
			c.ExtensionOrder = append(c.ExtensionOrder, k[1])
		}
	}
	c.applyDefaults()
	if err := errors.Join(c.Validate(), c.resolvePeerUsers()); err != nil {
		return nil, err
	}
	return &c, nil
}

// StaticExtensions returns the [extensions] pairs in the order of the file; pairs that are
// not in ExtensionOrder (set in code) follow in key order.
func (c *Config) StaticExtensions() status.Fields {
	out := make(status.Fields, 0, len(c.Extensions))
	seen := map[string]bool{}
	for _, k := range c.ExtensionOrder {
		if v, ok := c.Extensions[k]; ok && !seen[k] {
			out = append(out, status.Field{Key: k, Value: v})
			seen[k] = true
		}
	}
	for _, f := range status.SortedFields(c.Extensions) {
		if !seen[f.Key] {
			out = append(out, f)
		}
	}
	return out
}

// resolvePeerUsers adds the uid of every peer_users name to PeerUIDs. A name that does not
// resolve is an error: silently dropping it would lock ota-net out with no hint why.
func (c *Config) resolvePeerUsers() error {
	var errs []error
	for i, name := range c.PeerUsers {
		if name == "" {
			errs = append(errs, fmt.Errorf("peer_users[%d]: empty user name", i))
			continue
		}
		u, err := user.Lookup(name)
		if err != nil {
			if errors.As(err, new(user.UnknownUserError)) {
				errs = append(errs, fmt.Errorf("peer_users[%d]: no user %q on this system", i, name))
			} else {
				errs = append(errs, fmt.Errorf("peer_users[%d]: look up %q: %w", i, name, err))
			}
			continue
		}
		uid, err := strconv.Atoi(u.Uid)
		if err != nil || uid < 0 {
			errs = append(errs, fmt.Errorf("peer_users[%d]: user %q has non-numeric uid %q", i, name, u.Uid))
			continue
		}
		if !slices.Contains(c.PeerUIDs, uid) {
			c.PeerUIDs = append(c.PeerUIDs, uid)
		}
	}
	return errors.Join(errs...)
}

func (c *Config) applyDefaults() {
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.MaxBlockSize == 0 {
		c.MaxBlockSize = DefaultMaxBlockSize
	}
	if c.SyncBytes == 0 {
		c.SyncBytes = DefaultSyncBytes
	}
	if c.SyncInterval == 0 {
		c.SyncInterval = DefaultSyncInterval
	}
	if c.VersionPolicy == "" {
		c.VersionPolicy = VersionAny
	}
	if c.SelfTestTimeout == 0 {
		c.SelfTestTimeout = DefaultSelfTestTimeout
	}
	if c.FreeSpaceReserve == nil {
		r := uint64(DefaultFreeSpaceReserve)
		c.FreeSpaceReserve = &r
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.Boot.Backend == "" {
		c.Boot.Backend = BootFile
	}
	if c.Boot.BootLimit == 0 {
		c.Boot.BootLimit = DefaultBootLimit
	}
	switch c.Boot.Backend {
	case BootUBoot:
		if c.Boot.FwPrintenv == "" {
			c.Boot.FwPrintenv = "fw_printenv"
		}
		if c.Boot.FwSetenv == "" {
			c.Boot.FwSetenv = "fw_setenv"
		}
	case BootGRUB:
		if c.Boot.GrubEnv == "" {
			c.Boot.GrubEnv = "/boot/grub/grubenv"
		}
		if c.Boot.GrubEditenv == "" {
			c.Boot.GrubEditenv = "grub-editenv"
		}
	}
	for i := range c.Checks {
		if c.Checks[i].Timeout == 0 {
			c.Checks[i].Timeout = c.SelfTestTimeout
		}
	}
	for i := range c.ExtensionCommands {
		if c.ExtensionCommands[i].Timeout == 0 {
			c.ExtensionCommands[i].Timeout = DefaultCommandTimeout
		}
	}
}

// Validate checks the whole configuration and reports every problem it finds.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if !filepath.IsAbs(c.Socket) {
		bad("socket: %q is not an absolute path", c.Socket)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("state_dir: %q is not an absolute path", c.StateDir)
	}
	for _, u := range c.PeerUIDs {
		// uid_t is 32 bits and (uid_t)-1 is "no uid": a larger number would wrap to another
		// user where the server converts it (4294967297 would allow uid 1).
		if u < 0 || int64(u) >= math.MaxUint32 {
			bad("peer_uids: %d is not a uid (0..%d)", u, uint32(math.MaxUint32-1))
		}
	}
	for i, k := range c.TrustedKeys {
		if !filepath.IsAbs(k) {
			bad("trusted_keys[%d]: %q is not an absolute path", i, k)
		}
	}
	if len(c.RebootCommand) > 0 && c.RebootCommand[0] == "" {
		bad("reboot_command: empty program")
	}
	if c.MaxBlockSize < MinBlockSize || c.MaxBlockSize > MaxMaxBlockSize {
		bad("max_block_size: %d outside %d..%d", c.MaxBlockSize, MinBlockSize, MaxMaxBlockSize)
	}
	if c.SyncBytes < 0 {
		bad("sync_bytes: %d is negative", c.SyncBytes)
	}
	if c.SyncInterval < 0 {
		bad("sync_interval: %s is negative", c.SyncInterval)
	}
	if c.SelfTestTimeout < 0 {
		bad("self_test_timeout: %s is negative", c.SelfTestTimeout)
	}
	switch c.VersionPolicy {
	case VersionAny, VersionNewer, VersionNotSame:
	default:
		bad("version_policy: %q is not any, newer or not_same", c.VersionPolicy)
	}
	switch strings.ToLower(c.LogLevel) {
	case "trace", "debug", "info", "warn", "error", "off":
	default:
		bad("log_level: %q is not trace, debug, info, warn, error or off", c.LogLevel)
	}
	c.validateBoot(bad)
	c.validateTargets(bad)
	c.validateCommands("check", c.Checks, bad)
	c.validateCommands("extension_command", c.ExtensionCommands, bad)
	for k := range c.Extensions {
		if !status.ValidKey(k) {
			bad("extensions: key %q must be 1..128 of [A-Za-z0-9:_-] (AWS statusDetails keys)", k)
		}
	}
	return errors.Join(errs...)
}

func (c *Config) validateBoot(bad func(string, ...any)) {
	b := c.Boot
	if b.BootLimit < 1 || b.BootLimit > 255 {
		bad("boot.boot_limit: %d outside 1..255", b.BootLimit)
	}
	switch b.Backend {
	case BootFile:
		if b.FwEnvConfig != "" || b.FwPrintenv != "" || b.FwSetenv != "" || b.GrubEnv != "" || b.GrubEditenv != "" {
			bad("boot: uboot/grub keys set with backend %q", b.Backend)
		}
		if b.BootIDFile != "" && !filepath.IsAbs(b.BootIDFile) {
			bad("boot.boot_id_file: %q is not an absolute path", b.BootIDFile)
		}
	case BootUBoot:
		if b.BootIDFile != "" {
			bad("boot.boot_id_file: only for backend %q", BootFile)
		}
		if b.FwEnvConfig != "" && !filepath.IsAbs(b.FwEnvConfig) {
			bad("boot.fw_env_config: %q is not an absolute path", b.FwEnvConfig)
		}
		if b.GrubEnv != "" || b.GrubEditenv != "" {
			bad("boot: grub keys set with backend uboot")
		}
	case BootGRUB:
		if !filepath.IsAbs(b.GrubEnv) {
			bad("boot.grub_env: %q is not an absolute path", b.GrubEnv)
		}
		if b.FwEnvConfig != "" || b.FwPrintenv != "" || b.FwSetenv != "" {
			bad("boot: uboot keys set with backend grub")
		}
	default:
		bad("boot.backend: %q is not file, uboot or grub", b.Backend)
	}
	b.validateCmdline(bad)
}

func (c *Config) validateTargets(bad func(string, ...any)) {
	names := map[string]bool{}
	types := map[int32]string{}
	paths := map[string]string{}
	media := map[string]string{}
	abTarget := ""
	useMedium := func(t, p string) {
		p = filepath.Clean(p)
		if other, ok := media[p]; ok {
			bad("target %q: %s is already used by target %q", t, p, other)
		}
		media[p] = t
	}
	for i, t := range c.Targets {
		where := fmt.Sprintf("target[%d] %q", i, t.Name)
		if !nameRE.MatchString(t.Name) {
			bad("%s: name must be 1..64 of [A-Za-z0-9_.-], starting alphanumeric", where)
		}
		if names[t.Name] {
			bad("%s: duplicate target name", where)
		}
		names[t.Name] = true
		if len(t.FileTypes) == 0 && len(t.FilePaths) == 0 {
			bad("%s: neither file_types nor file_paths: no job could select it", where)
		}
		for _, ft := range t.FileTypes {
			if ft < 0 {
				bad("%s: file_types: %d is negative", where, ft)
			}
			if other, ok := types[ft]; ok {
				bad("%s: file type %d is already routed to target %q", where, ft, other)
			}
			types[ft] = t.Name
		}
		for _, fp := range t.FilePaths {
			if fp == "" {
				bad("%s: file_paths: empty value", where)
			}
			if other, ok := paths[fp]; ok {
				bad("%s: file path %q is already routed to target %q", where, fp, other)
			}
			paths[fp] = t.Name
		}
		if len(t.Compatible) > MaxCompatibleLen || strings.ContainsFunc(t.Compatible, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			bad("%s: compatible: at most %d printable characters", where, MaxCompatibleLen)
		}
		for j, k := range t.TrustedKeys {
			if !filepath.IsAbs(k) {
				bad("%s: trusted_keys[%d]: %q is not an absolute path", where, j, k)
			}
		}
		switch t.Kind {
		case KindAB:
			// The boot backend has one switch: activating slot b boots slot b of every A/B
			// target, so a second one could boot its unverified, half-written slot.
			if abTarget != "" {
				bad("%s: a second A/B target; target %q already uses the only boot switch (boot.backend %q), which would boot slot b of both when either is activated: keep one A/B target (put the kernel in the root file system) or make %q a file target",
					where, abTarget, c.Boot.Backend, t.Name)
			} else {
				abTarget = t.Name
			}
			if t.Path != "" {
				bad("%s: path is for kind \"file\"; kind \"ab\" uses slots", where)
			}
			if t.AllowWritableDir {
				bad("%s: allow_writable_dir is for kind \"file\"", where)
			}
			if len(t.Slots) != 2 {
				bad("%s: slots must name exactly two paths (slot a, slot b), got %d", where, len(t.Slots))
				break
			}
			for j, s := range t.Slots {
				if !filepath.IsAbs(s) {
					bad("%s: slots[%d]: %q is not an absolute path", where, j, s)
				}
			}
			if filepath.Clean(t.Slots[0]) == filepath.Clean(t.Slots[1]) {
				bad("%s: slots a and b are the same path %q", where, t.Slots[0])
			}
			useMedium(t.Name, t.Slots[0])
			useMedium(t.Name, t.Slots[1])
		case KindFile:
			if len(t.Slots) != 0 {
				bad("%s: slots are for kind \"ab\"; kind \"file\" uses path", where)
			}
			if !filepath.IsAbs(t.Path) || strings.HasSuffix(t.Path, "/") {
				bad("%s: path %q is not an absolute file path", where, t.Path)
			} else {
				useMedium(t.Name, t.Path)
				if !t.AllowWritableDir {
					if err := SafeDir(filepath.Dir(t.Path)); err != nil {
						bad("%s: %v (set allow_writable_dir = true to accept this)", where, err)
					}
				}
			}
		default:
			bad("%s: kind %q is not ab or file", where, t.Kind)
		}
	}
}

func (c *Config) validateCommands(section string, cmds []Command, bad func(string, ...any)) {
	seen := map[string]bool{}
	for i, cmd := range cmds {
		where := fmt.Sprintf("%s[%d] %q", section, i, cmd.Name)
		if !nameRE.MatchString(cmd.Name) {
			bad("%s: name must be 1..64 of [A-Za-z0-9_.-]", where)
		}
		if seen[cmd.Name] {
			bad("%s: duplicate name", where)
		}
		seen[cmd.Name] = true
		if len(cmd.Command) == 0 || cmd.Command[0] == "" {
			bad("%s: command is empty", where)
		}
		if cmd.Timeout <= 0 {
			bad("%s: timeout must be positive", where)
		}
	}
}

// Reserve is FreeSpaceReserve with its default applied.
func (c *Config) Reserve() uint64 {
	if c.FreeSpaceReserve == nil {
		return DefaultFreeSpaceReserve
	}
	return *c.FreeSpaceReserve
}

// TargetByName returns the configured target called name.
func (c *Config) TargetByName(name string) (*Target, bool) {
	i := slices.IndexFunc(c.Targets, func(t Target) bool { return t.Name == name })
	if i < 0 {
		return nil, false
	}
	return &c.Targets[i], true
}
