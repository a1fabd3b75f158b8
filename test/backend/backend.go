// Package backend is the Go API that end-to-end tests use to drive the cloud side of an OTA:
// create a job for a thing, watch its execution, read what the device reported. Two
// implementations exist: the local emulator (test/emulator, the default) and real AWS IoT
// (test/awsbackend, chosen from the environment). Tests written against this interface run
// unchanged against both.
package backend

import (
	"context"
	"time"
)

// Protocol names exactly as they appear in the afr_ota job document.
const (
	ProtocolMQTT = "MQTT"
	ProtocolHTTP = "HTTP"
)

// Job execution statuses as AWS IoT spells them.
const (
	StatusQueued     = "QUEUED"
	StatusInProgress = "IN_PROGRESS"
	StatusSucceeded  = "SUCCEEDED"
	StatusFailed     = "FAILED"
	StatusRejected   = "REJECTED"
	StatusTimedOut   = "TIMED_OUT"
	StatusRemoved    = "REMOVED"
	StatusCanceled   = "CANCELED"
)

// Signature algorithms, named by the afr_ota key suffix ("sig-sha256-ecdsa" -> "sha256-ecdsa").
const (
	SigSHA256ECDSA   = "sha256-ecdsa"
	SigSHA256RSA     = "sha256-rsa"     // PKCS#1 v1.5
	SigSHA256RSAPSS  = "sha256-rsa-pss" // this project's extension
	SigSHA256Ed25519 = "sha256-ed25519" // this project's extension
)

// FileSpec is one entry of the job document's "files" list.
type FileSpec struct {
	// LocalPath is the image on this machine that the job delivers.
	LocalPath string
	// DevicePath is the document's "filepath" (selects a writer target together with FileType).
	DevicePath string
	FileType   int
	FileID     int
	// CertName is the document's "certfile".
	CertName string
	// Either SigningKeyPEM (a PKCS#8/EC/RSA private key in PEM; the backend signs the file with
	// SigAlgorithm) or Signature (raw signature bytes made elsewhere, e.g. by openssl).
	SigningKeyPEM []byte
	Signature     []byte
	SigAlgorithm  string
}

// JobSpec describes an afr_ota job.
type JobSpec struct {
	JobID     string
	Things    []string // empty: the backend's default thing
	Protocols []string // MQTT, HTTP or both
	Files     []FileSpec
	// URLExpiry is the lifetime of presigned HTTP URLs (0: backend default).
	URLExpiry time.Duration
}

// Execution is a job execution as DescribeJobExecution returns it.
type Execution struct {
	JobID           string
	ThingName       string
	Status          string
	StatusDetails   map[string]string
	VersionNumber   int64
	ExecutionNumber int64
}

// Update is one accepted UpdateJobExecution the device made, in order.
type Update struct {
	At            time.Time
	Status        string
	StatusDetails map[string]string
}

// Backend is the cloud side of an OTA as tests see it.
type Backend interface {
	// Name is "emulator" or "aws".
	Name() string
	// ThingName is the default thing (also the MQTT client id the device must use).
	ThingName() string
	// BrokerURL is what the device connects to (mqtt://127.0.0.1:port, mqtts://...:8883).
	BrokerURL() string
	CreateJob(ctx context.Context, spec JobSpec) error
	CancelJob(ctx context.Context, jobID string, force bool) error
	DeleteJob(ctx context.Context, jobID string, force bool) error
	// Describe returns the current execution of jobID for the default thing.
	Describe(ctx context.Context, jobID string) (Execution, error)
	// WaitStatus blocks until the execution reaches one of the statuses (or ctx ends).
	WaitStatus(ctx context.Context, jobID string, statuses ...string) (Execution, error)
	// Updates returns the accepted updates recorded for jobID, oldest first. The emulator
	// records every one; the AWS backend returns those it observed by polling.
	Updates(jobID string) []Update
	Close() error
}

// ManifestSuffix ends the document path of a manifest: the file of the same path without it
// is its chunk file (docs/MANIFEST.md, "One OTA update, two files"; writer/manifest.PathSuffix).
const ManifestSuffix = ".gwota-manifest"

// DeltaFiles returns the two files of one delta update, as an operator lists them for
// create-ota-update (docs/MANIFEST.md): the manifest, signed as manifest says (its LocalPath,
// DevicePath, FileType, FileID and signing fields; its DevicePath gets ManifestSuffix), and
// the unsigned chunk file at chunksPath under manifest's DevicePath with the next file id.
func DeltaFiles(manifest FileSpec, chunksPath string) []FileSpec {
	chunks := FileSpec{LocalPath: chunksPath, DevicePath: manifest.DevicePath, FileType: manifest.FileType, FileID: manifest.FileID + 1}
	manifest.DevicePath += ManifestSuffix
	return []FileSpec{manifest, chunks}
}
