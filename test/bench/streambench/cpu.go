package main

import (
	"fmt"
	"os"
	"runtime/pprof"
	"strings"
	"time"
)

// mosquittoPID is the broker's process, for CPU accounting.
var mosquittoPID int

// cpuTimes is user+system CPU of one process so far, from /proc/PID/stat (clock ticks of
// 10 ms on Linux).
func cpuTimes(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may hold spaces: fields are counted after its closing parenthesis.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		s = s[i+1:]
	}
	f := strings.Fields(s)
	if len(f) < 13 {
		return 0
	}
	var ut, st int64
	fmt.Sscan(f[11], &ut)
	fmt.Sscan(f[12], &st)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// cpuMeter measures the CPU the bench process (emulator or floor clients), the broker and
// the downloader child spend during one case.
type cpuMeter struct {
	self, broker time.Duration
	child        time.Duration
}

func startCPU() cpuMeter {
	return cpuMeter{self: cpuTimes(os.Getpid()), broker: cpuTimes(mosquittoPID)}
}

func (m cpuMeter) stop() cpuMeter {
	return cpuMeter{self: cpuTimes(os.Getpid()) - m.self, broker: cpuTimes(mosquittoPID) - m.broker}
}

func (m cpuMeter) String() string {
	s := fmt.Sprintf("cpu: bench %.2fs, mosquitto %.2fs", m.self.Seconds(), m.broker.Seconds())
	if m.child > 0 {
		s += fmt.Sprintf(", downloader %.2fs", m.child.Seconds())
	}
	return s
}

// profileSelf starts a CPU profile of this process (the emulator's side) when path is set.
func profileSelf(path string) func() {
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return func() {}
	}
	return func() { pprof.StopCPUProfile(); f.Close() }
}
