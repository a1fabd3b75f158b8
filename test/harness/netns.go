package harness

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/big"
	"os"
	"os/exec"
)

// Fence is a network namespace joined to the test's own by one veth pair and nothing else: a
// process in it reaches HostIP (the veth end in the test's namespace) and no other address of
// the machine. Its 127.0.0.1 is its own loopback, so the emulator's broker and file server,
// which listen on the machine's loopback, are out of its reach; a proxy listening on HostIP
// is the only way to them.
type Fence struct {
	Name   string // /run/netns/<Name>
	HostIP string // the test namespace's end of the pair
	InIP   string // the fenced end
	link   string
}

// NewFence creates the namespace (needs root and iproute2).
func NewFence() (*Fence, error) {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	n, err := rand.Int(rand.Reader, big.NewInt(250))
	if err != nil {
		return nil, err
	}
	sub := int(n.Int64()) + 1
	quad, err := rand.Int(rand.Reader, big.NewInt(63))
	if err != nil {
		return nil, err
	}
	base := int(quad.Int64()) * 4
	id := hex.EncodeToString(b[:])
	f := &Fence{Name: "gwfence-" + id, link: "gwf" + id,
		HostIP: fmt.Sprintf("10.213.%d.%d", sub, base+1), InIP: fmt.Sprintf("10.213.%d.%d", sub, base+2)}
	if out, err := exec.Command("ip", "netns", "add", f.Name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add: %w: %s", err, out)
	}
	steps := [][]string{
		{"-n", f.Name, "link", "set", "lo", "up"},
		{"link", "add", f.link + "h", "type", "veth", "peer", "name", f.link + "n", "netns", f.Name},
		{"addr", "add", f.HostIP + "/30", "dev", f.link + "h"},
		{"link", "set", f.link + "h", "up"},
		{"-n", f.Name, "addr", "add", f.InIP + "/30", "dev", f.link + "n"},
		{"-n", f.Name, "link", "set", f.link + "n", "up"},
	}
	for _, args := range steps {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			f.Close()
			return nil, fmt.Errorf("ip %v: %w: %s", args, err, out)
		}
	}
	return f, nil
}

// Prefix runs a command inside the namespace (nsenter execs it: same process, same pid).
func (f *Fence) Prefix() []string {
	return []string{"nsenter", "--net=/run/netns/" + f.Name, "--"}
}

// Close deletes the namespace and with it the veth pair.
func (f *Fence) Close() {
	_ = exec.Command("ip", "link", "del", f.link+"h").Run()
	_ = exec.Command("ip", "netns", "del", f.Name).Run()
}

// CanFence reports whether this process can make fences (root with iproute2 and nsenter).
func CanFence() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root for network namespaces")
	}
	for _, c := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(c); err != nil {
			return fmt.Errorf("%s is not installed", c)
		}
	}
	return nil
}
