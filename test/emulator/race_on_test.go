//go:build race

package emulator

// raceEnabled trims the slowest data volumes: the race detector makes copying 128 KiB
// blocks through MQTT about ten times slower.
const raceEnabled = true
