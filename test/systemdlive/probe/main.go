// Command gwota-probe tries operations from inside a systemd unit's sandbox and reports what
// the kernel answered, as JSON. The live deployment test (test/systemdlive) runs it as an
// ExecStartPre= of the real ota-writer.service and ota-net.service, and again outside the
// sandbox as the negative control: each claim of deploy/README.md is an operation that
// succeeds in one place and is refused in the other.
//
//	gwota-probe [--out FILE] OP...
//
// Operations: whoami, open-r:PATH, open-rw:PATH, create:PATH (created and removed),
// setuid (setuid(getuid()), in @privileged), setpriority (lower its own priority, in
// @resources), inet (an AF_INET socket), connect:HOST:PORT (TCP), creds (the files in
// $CREDENTIALS_DIRECTORY with their SHA-256).
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Result is one operation's outcome; Err is the errno name ("EPERM") or a message.
type Result struct {
	Op    string `json:"op"`
	OK    bool   `json:"ok"`
	Err   string `json:"err,omitempty"`
	Value string `json:"value,omitempty"`
}

func main() {
	args := os.Args[1:]
	out := ""
	if len(args) >= 2 && args[0] == "--out" {
		out, args = args[1], args[2:]
	}
	res := make([]Result, 0, len(args))
	for _, op := range args {
		v, err := run(op)
		r := Result{Op: op, OK: err == nil, Value: v}
		if err != nil {
			r.Err = errName(err)
		}
		res = append(res, r)
	}
	b, err := json.Marshal(res)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if out == "" {
		fmt.Println(string(b))
		return
	}
	// Written whole and renamed: the test reads it only once the unit has started.
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if err := os.Rename(tmp, out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}

func run(op string) (string, error) {
	name, arg, _ := strings.Cut(op, ":")
	switch name {
	case "whoami":
		return fmt.Sprintf("uid=%d gid=%d", os.Getuid(), os.Getgid()), nil
	case "open-r", "open-rw":
		flag := os.O_RDONLY
		if name == "open-rw" {
			flag = os.O_RDWR
		}
		f, err := os.OpenFile(arg, flag, 0)
		if err != nil {
			return "", err
		}
		return "", f.Close()
	case "create":
		f, err := os.OpenFile(arg, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return "", err
		}
		f.Close()
		return "", os.Remove(arg)
	case "setuid":
		// Raw: Go's syscall.Setuid runs on every thread; one thread is enough here.
		if _, _, e := unix.RawSyscall(unix.SYS_SETUID, uintptr(os.Getuid()), 0, 0); e != 0 {
			return "", e
		}
		return "", nil
	case "setpriority":
		return "", unix.Setpriority(unix.PRIO_PROCESS, 0, 19)
	case "inet":
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return "", err
		}
		return "", unix.Close(fd)
	case "connect":
		c, err := net.DialTimeout("tcp", arg, 3*time.Second)
		if err != nil {
			return "", err
		}
		return "", c.Close()
	case "creds":
		dir := os.Getenv("CREDENTIALS_DIRECTORY")
		if dir == "" {
			return "", errors.New("CREDENTIALS_DIRECTORY not set")
		}
		ents, err := os.ReadDir(dir)
		if err != nil {
			return "", err
		}
		var parts []string
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				return "", err
			}
			s := sha256.Sum256(b)
			parts = append(parts, e.Name()+"="+hex.EncodeToString(s[:]))
		}
		return dir + " " + strings.Join(parts, ","), nil
	}
	return "", fmt.Errorf("unknown operation %q", op)
}

func errName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if n := unix.ErrnoName(errno); n != "" {
			return n
		}
	}
	return err.Error()
}
