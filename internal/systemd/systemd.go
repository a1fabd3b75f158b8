// Package systemd is the daemons' small interface to the service manager:
// readiness and stopping notifications, the watchdog loop, and the listening
// socket passed by socket activation. Every function is a no-op when the
// process was not started by systemd, so the daemons run the same by hand.
package systemd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Ready tells the service manager that start-up finished (Type=notify).
// It returns nil when there is no service manager to tell.
func Ready() error { return notify(daemon.SdNotifyReady) }

// Stopping tells the service manager that an orderly shutdown began, so
// that a slow drain is not mistaken for a hang.
func Stopping() error { return notify(daemon.SdNotifyStopping) }

// Status sets the one-line status that `systemctl status` shows.
func Status(msg string) error {
	// The protocol is line-based: a newline would start another assignment.
	return notify("STATUS=" + strings.ReplaceAll(msg, "\n", " "))
}

func notify(state string) error {
	// unsetEnvironment=false: the watchdog loop keeps using NOTIFY_SOCKET.
	if _, err := daemon.SdNotify(false, state); err != nil {
		return fmt.Errorf("sd_notify %q: %w", state, err)
	}
	return nil
}

// WatchdogInterval is the period the service manager expects pings at
// (WATCHDOG_USEC), or 0 when the watchdog is off for this process.
func WatchdogInterval() (time.Duration, error) {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0, fmt.Errorf("watchdog: %w", err)
	}
	return d, nil
}

// Watchdog pings the service manager at half the watchdog interval for as
// long as ctx lives and healthy reports no error. While healthy fails it
// withholds the ping and publishes the error as the unit's status, so a
// wedged daemon is restarted by systemd rather than kept alive by a timer
// that still runs. It returns nil at once when the watchdog is not enabled,
// and nil when ctx ends.
func Watchdog(ctx context.Context, healthy func() error) error {
	interval, err := WatchdogInterval()
	if err != nil || interval == 0 {
		return err
	}
	tick := time.NewTicker(interval / 2)
	defer tick.Stop()
	failing := false
	for {
		if herr := check(healthy); herr != nil {
			failing = true
			// Best effort: the missing ping is what matters.
			_ = Status("unhealthy: " + herr.Error())
		} else {
			if failing {
				failing = false
				_ = Status("healthy")
			}
			if err := notify(daemon.SdNotifyWatchdog); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func check(healthy func() error) (err error) {
	if healthy == nil {
		return nil
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("health check panicked: %v", r)
		}
	}()
	return healthy()
}

// ErrNotUnix is returned when the passed socket is not a Unix stream socket.
var ErrNotUnix = errors.New("passed socket is not a unix stream listener")

// Listener returns the Unix stream listener that systemd passed (LISTEN_FDS,
// LISTEN_PID, LISTEN_FDNAMES). name selects by FileDescriptorName= (systemd
// defaults it to the socket unit's name); "" takes the first socket.
// ok is false when no socket was passed to this process; the daemon then
// listens by itself. Passed descriptors not returned are closed, and the
// variables are removed so that children do not inherit them.
func Listener(name string) (l net.Listener, ok bool, err error) {
	files := activation.Files(true)
	if len(files) == 0 {
		return nil, false, nil
	}
	var chosen *os.File
	for _, f := range files {
		if chosen == nil && (name == "" || f.Name() == name) {
			chosen = f
			continue
		}
		f.Close()
	}
	if chosen == nil {
		return nil, false, fmt.Errorf("socket activation: no passed socket named %q", name)
	}
	defer chosen.Close() // net.FileListener dups it.
	fl, err := net.FileListener(chosen)
	if err != nil {
		return nil, false, fmt.Errorf("socket activation: fd %d (%s): %w", chosen.Fd(), chosen.Name(), err)
	}
	ul, isUnix := fl.(*net.UnixListener)
	if !isUnix {
		fl.Close()
		return nil, false, fmt.Errorf("socket activation: %s: %w", chosen.Name(), ErrNotUnix)
	}
	// systemd owns the socket path (it removes it when the .socket unit
	// stops); closing the listener must not unlink it.
	ul.SetUnlinkOnClose(false)
	return ul, true, nil
}
