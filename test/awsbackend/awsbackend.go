// Package awsbackend implements backend.Backend against real AWS IoT, so the end-to-end tests
// that run against the emulator can run unchanged against the real service.
//
// Jobs are plain AWS IoT jobs (CreateJob) carrying an afr_ota document that this package builds
// itself, in the shape the OTA service produces. That keeps the signature under the test's
// control (custom code signing: the file is signed here, or the test passes a signature made
// elsewhere) and supports this project's extra signature algorithms, which CreateOTAUpdate and
// AWS Signer do not. For each job:
//   - every file is uploaded to S3 (OTA_AWS_BUCKET, under OTA_AWS_KEY_PREFIX);
//   - MQTT: a stream is created (CreateStream, file i at its FileSpec.FileID), which is what the
//     OTA service does; the service role lets AWS IoT read the objects;
//   - HTTP: update_data_url is the Jobs presigned-URL placeholder, so AWS IoT signs a fresh URL
//     on every job document request (the device can re-fetch the document when a URL expires);
//     without a service role (only possible through Options) the URL is presigned here instead;
//   - the job is created with targetSelection SNAPSHOT and CreateJob waits until the execution
//     of every target thing exists.
//
// Everything created is tracked and removed by Close, which is safe to call from t.Cleanup
// after a failure or a panic. Stale QUEUED/IN_PROGRESS executions of the thing are canceled
// when the backend starts, so an earlier crashed run cannot feed the device an old job.
package awsbackend

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/stscreds"
	"github.com/aws/aws-sdk-go-v2/service/iot"
	iottypes "github.com/aws/aws-sdk-go-v2/service/iot/types"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/sign"
)

var _ backend.Backend = (*Backend)(nil)

// Options configure a Backend. FromEnv fills them from OTA_AWS_* variables; tests fill them
// directly to point every client at a local stand-in server.
type Options struct {
	// Endpoint is the device data endpoint (xxxx-ats.iot.REGION.amazonaws.com).
	Endpoint string
	// Thing is the default thing; it must exist.
	Thing string
	// Region; empty: taken from Endpoint.
	Region string
	// Bucket holds uploaded files under KeyPrefix (default "gwota-e2e/").
	Bucket    string
	KeyPrefix string
	// ServiceRoleARN is the role AWS IoT assumes to read the bucket (streams, presigned URLs).
	// Required for MQTT jobs.
	ServiceRoleARN string
	// AssumeRoleARN, when set, is assumed through STS with the base credentials.
	AssumeRoleARN string
	// BaseEndpoint, when set, points the iot, s3 (path style) and sts clients at one URL.
	BaseEndpoint string
	// Credentials; nil: the SDK's default chain (environment, shared files, IMDS...).
	Credentials aws.CredentialsProvider
	// HTTPClient; nil: a private client whose idle connections Close releases.
	HTTPClient *http.Client
	// PollMin and PollMax bound the DescribeJobExecution backoff (default 250ms and 5s).
	PollMin, PollMax time.Duration
	// CloseTimeout bounds the clean-up in Close (default 2 minutes).
	CloseTimeout time.Duration
	// Logf, when set, receives one line per resource created or removed.
	Logf func(format string, args ...any)
}

// Environment variables read by FromEnv and Configured.
const (
	EnvEndpoint       = "OTA_AWS_ENDPOINT"
	EnvThing          = "OTA_AWS_THING"
	EnvRegion         = "OTA_AWS_REGION"
	EnvBucket         = "OTA_AWS_BUCKET"
	EnvKeyPrefix      = "OTA_AWS_KEY_PREFIX"
	EnvServiceRoleARN = "OTA_AWS_SERVICE_ROLE_ARN"
	EnvRoleARN        = "OTA_AWS_ROLE_ARN"
	// EnvDefaultCredentials=1 accepts the SDK's default chain (shared config files, instance
	// or container roles) when no credential variable is set.
	EnvDefaultCredentials = "OTA_AWS_DEFAULT_CREDENTIALS"
)

// Configured reports whether the environment selects real AWS IoT; when not, why names the
// missing variables, ready for t.Skip.
func Configured() (ok bool, why string) {
	var missing []string
	for _, v := range []string{EnvEndpoint, EnvThing, EnvBucket, EnvServiceRoleARN} {
		if os.Getenv(v) == "" {
			missing = append(missing, v)
		}
	}
	if os.Getenv(EnvRegion) == "" && regionFromEndpoint(os.Getenv(EnvEndpoint)) == "" && os.Getenv(EnvEndpoint) != "" {
		missing = append(missing, EnvRegion+" (not derivable from "+EnvEndpoint+")")
	}
	if !haveCredentials() {
		missing = append(missing, "credentials (AWS_ACCESS_KEY_ID+AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "+
			"AWS_WEB_IDENTITY_TOKEN_FILE, AWS_CONTAINER_CREDENTIALS_*_URI, or "+EnvDefaultCredentials+"=1)")
	}
	if len(missing) > 0 {
		return false, "real AWS IoT backend not configured: missing " + strings.Join(missing, ", ")
	}
	return true, ""
}

func haveCredentials() bool {
	set := func(v string) bool { return os.Getenv(v) != "" }
	return set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY") ||
		set("AWS_PROFILE") || set("AWS_WEB_IDENTITY_TOKEN_FILE") ||
		set("AWS_CONTAINER_CREDENTIALS_FULL_URI") || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") ||
		os.Getenv(EnvDefaultCredentials) == "1"
}

// FromEnv builds a Backend from OTA_AWS_* variables (see Configured).
func FromEnv(ctx context.Context) (*Backend, error) {
	if ok, why := Configured(); !ok {
		return nil, errors.New(why)
	}
	return New(ctx, envOptions())
}

func envOptions() Options {
	return Options{
		Endpoint:       os.Getenv(EnvEndpoint),
		Thing:          os.Getenv(EnvThing),
		Region:         os.Getenv(EnvRegion),
		Bucket:         os.Getenv(EnvBucket),
		KeyPrefix:      os.Getenv(EnvKeyPrefix),
		ServiceRoleARN: os.Getenv(EnvServiceRoleARN),
		AssumeRoleARN:  os.Getenv(EnvRoleARN),
	}
}

// ForTest returns the AWS backend configured by the environment, logging to t and closed by
// t.Cleanup (which also runs after a failure or a panic). When the environment does not
// configure real AWS it skips t, naming the missing variables.
func ForTest(t testing.TB) *Backend {
	t.Helper()
	ok, why := Configured()
	if !ok {
		t.Skip(why)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	opts := envOptions()
	opts.Logf = t.Logf
	b, err := New(ctx, opts)
	if err != nil {
		t.Fatalf("awsbackend: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("awsbackend: clean-up: %v", err)
		}
	})
	return b
}

// regionFromEndpoint reads REGION from xxxx-ats.iot.REGION.amazonaws.com[.cn].
func regionFromEndpoint(ep string) string {
	host := hostOf(ep)
	labels := strings.Split(host, ".")
	for i := 0; i+2 < len(labels); i++ {
		if labels[i] == "iot" && labels[i+2] == "amazonaws" {
			return labels[i+1]
		}
	}
	return ""
}

// hostOf strips a scheme, path and port from an endpoint.
func hostOf(ep string) string {
	if i := strings.Index(ep, "://"); i >= 0 {
		ep = ep[i+3:]
	}
	if i := strings.IndexAny(ep, "/"); i >= 0 {
		ep = ep[:i]
	}
	if i := strings.LastIndex(ep, ":"); i >= 0 {
		ep = ep[:i]
	}
	return ep
}

// resource is one thing Close must remove.
type resource struct {
	kind string // "object", "stream", "job"
	id   string // object key, stream id, job id
}

// Backend drives real AWS IoT. Methods are safe for concurrent use.
type Backend struct {
	opts     Options
	iot      *iot.Client
	s3       *s3.Client
	presign  *s3.PresignClient
	httpc    *http.Client
	thingARN string
	runID    string // random, names this run's S3 objects

	mu       sync.Mutex
	created  []resource // in creation order; Close removes them in reverse
	observed map[string][]backend.Update
	lastVer  map[string]int64
	closed   bool
	closeErr error
}

var (
	jobIDRe    = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)
	thingRe    = regexp.MustCompile(`^[a-zA-Z0-9:_-]{1,128}$`)
	errNoThing = errors.New("awsbackend: no thing configured")
)

// New connects to AWS with opts, checks the thing exists and cancels its stale executions.
func New(ctx context.Context, opts Options) (*Backend, error) {
	if opts.Thing == "" {
		return nil, errNoThing
	}
	if !thingRe.MatchString(opts.Thing) {
		return nil, fmt.Errorf("awsbackend: invalid thing name %q", opts.Thing)
	}
	if opts.Bucket == "" {
		return nil, errors.New("awsbackend: no bucket configured")
	}
	if opts.Region == "" {
		opts.Region = regionFromEndpoint(opts.Endpoint)
		if opts.Region == "" {
			return nil, fmt.Errorf("awsbackend: no region and none in endpoint %q", opts.Endpoint)
		}
	}
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = "gwota-e2e/"
	}
	if opts.PollMin <= 0 {
		opts.PollMin = 250 * time.Millisecond
	}
	if opts.PollMax < opts.PollMin {
		opts.PollMax = max(5*time.Second, opts.PollMin)
	}
	if opts.CloseTimeout <= 0 {
		opts.CloseTimeout = 2 * time.Minute
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	loadOpts := []func(*config.LoadOptions) error{config.WithRegion(opts.Region)}
	if opts.Credentials != nil {
		loadOpts = append(loadOpts, config.WithCredentialsProvider(opts.Credentials))
	}
	cfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("awsbackend: load AWS config: %w", err)
	}
	httpc := opts.HTTPClient
	if httpc == nil {
		// Our own client on the transport the SDK configured (AWS_CA_BUNDLE and the like),
		// because the SDK's clients hide their transport and Close must release connections.
		tr := http.DefaultTransport.(*http.Transport).Clone()
		if bc, ok := cfg.HTTPClient.(*awshttp.BuildableClient); ok {
			tr = bc.GetTransport()
		}
		httpc = &http.Client{
			Transport: tr,
			// As the SDK's own client: a redirect is an answer, not something to follow.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	cfg.HTTPClient = httpc
	base := func(p **string) {
		if opts.BaseEndpoint != "" {
			*p = aws.String(opts.BaseEndpoint)
		}
	}
	if opts.AssumeRoleARN != "" {
		stsc := sts.NewFromConfig(cfg, func(o *sts.Options) { base(&o.BaseEndpoint) })
		cfg.Credentials = aws.NewCredentialsCache(stscreds.NewAssumeRoleProvider(stsc, opts.AssumeRoleARN,
			func(o *stscreds.AssumeRoleOptions) { o.RoleSessionName = "gwota-e2e" }))
	}
	b := &Backend{
		runID:    rand.Text()[:10],
		opts:     opts,
		httpc:    httpc,
		iot:      iot.NewFromConfig(cfg, func(o *iot.Options) { base(&o.BaseEndpoint) }),
		observed: map[string][]backend.Update{},
		lastVer:  map[string]int64{},
	}
	b.s3 = s3.NewFromConfig(cfg, func(o *s3.Options) {
		base(&o.BaseEndpoint)
		// A stand-in server (or AWS_ENDPOINT_URL) has no per-bucket host names.
		o.UsePathStyle = opts.BaseEndpoint != "" || cfg.BaseEndpoint != nil
	})
	b.presign = s3.NewPresignClient(b.s3)

	th, err := b.iot.DescribeThing(ctx, &iot.DescribeThingInput{ThingName: aws.String(opts.Thing)})
	if err != nil {
		b.closeIdle()
		return nil, fmt.Errorf("awsbackend: thing %q: %w", opts.Thing, err)
	}
	b.thingARN = aws.ToString(th.ThingArn)
	if err := b.cancelStale(ctx); err != nil {
		b.closeIdle()
		return nil, err
	}
	return b, nil
}

// cancelStale cancels every QUEUED or IN_PROGRESS execution of the default thing (forcing the
// IN_PROGRESS ones), so the device starts from a clean queue.
func (b *Backend) cancelStale(ctx context.Context) error {
	for _, st := range []iottypes.JobExecutionStatus{iottypes.JobExecutionStatusQueued, iottypes.JobExecutionStatusInProgress} {
		var stale []string
		p := iot.NewListJobExecutionsForThingPaginator(b.iot, &iot.ListJobExecutionsForThingInput{
			ThingName: aws.String(b.opts.Thing),
			Status:    st,
		})
		for p.HasMorePages() {
			page, err := p.NextPage(ctx)
			if err != nil {
				return fmt.Errorf("awsbackend: list %s executions of %s: %w", st, b.opts.Thing, err)
			}
			for _, s := range page.ExecutionSummaries {
				stale = append(stale, aws.ToString(s.JobId))
			}
		}
		for _, id := range stale {
			_, err := b.iot.CancelJobExecution(ctx, &iot.CancelJobExecutionInput{
				JobId:     aws.String(id),
				ThingName: aws.String(b.opts.Thing),
				Force:     st == iottypes.JobExecutionStatusInProgress,
			})
			// It may have ended between the listing and the cancel.
			if err != nil && !isNotFound(err) && !isInvalidState(err) {
				return fmt.Errorf("awsbackend: cancel stale execution %s of %s: %w", id, b.opts.Thing, err)
			}
			b.opts.Logf("awsbackend: canceled stale %s execution %s of %s", st, id, b.opts.Thing)
		}
	}
	return nil
}

func (b *Backend) Name() string      { return "aws" }
func (b *Backend) ThingName() string { return b.opts.Thing }

// BrokerURL is the device data endpoint on the MQTT-over-TLS port.
func (b *Backend) BrokerURL() string {
	if b.opts.Endpoint == "" {
		return ""
	}
	return "mqtts://" + hostOf(b.opts.Endpoint) + ":8883"
}

// track records r for Close before the call that creates it: a call that fails after AWS
// acted (a lost response, a canceled context) must not leak what it made; Close ignores what
// is not there. It reports whether r was new.
func (b *Backend) track(r resource) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if slices.Contains(b.created, r) {
		return false
	}
	b.created = append(b.created, r)
	return true
}

func (b *Backend) untrack(r resource) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.created = slices.DeleteFunc(b.created, func(x resource) bool { return x == r })
}

func (b *Backend) checkOpen() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errors.New("awsbackend: closed")
	}
	return nil
}

// objectKey is PREFIX/RUN/JOBID/INDEX-NAME: the run id keeps a failed second CreateJob with
// the same job id, or a parallel run, from overwriting an object a live stream reads.
func (b *Backend) objectKey(jobID string, i int, localPath string) string {
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, path.Base(localPath))
	return fmt.Sprintf("%s%s/%s/%d-%s", b.opts.KeyPrefix, b.runID, jobID, i, name)
}

// escapeKey percent-encodes an S3 key for a URL path, keeping '/', as the "-v2" placeholder
// expects an encoded object URL.
func escapeKey(key string) string {
	var sb strings.Builder
	for _, c := range []byte(key) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~/", c) >= 0 {
			sb.WriteByte(c)
		} else {
			fmt.Fprintf(&sb, "%%%02X", c)
		}
	}
	return sb.String()
}

// streamID is derived from the job id so a leftover stream is easy to attribute.
func streamID(jobID string) string { return "gwota-" + jobID }

// CreateJob uploads the files, creates the stream (MQTT) and the job, and waits until the
// execution of every target thing exists. What it created before a failure is still removed by Close.
func (b *Backend) CreateJob(ctx context.Context, spec backend.JobSpec) error {
	if err := b.checkOpen(); err != nil {
		return err
	}
	if err := b.validate(spec); err != nil {
		return err
	}
	mqtt := slices.Contains(spec.Protocols, backend.ProtocolMQTT)
	httpProto := slices.Contains(spec.Protocols, backend.ProtocolHTTP)

	targets := []string{}
	things := spec.Things
	if len(things) == 0 {
		things = []string{b.opts.Thing}
	}
	for _, t := range things {
		if t == b.opts.Thing {
			targets = append(targets, b.thingARN)
			continue
		}
		out, err := b.iot.DescribeThing(ctx, &iot.DescribeThingInput{ThingName: aws.String(t)})
		if err != nil {
			return fmt.Errorf("awsbackend: thing %q: %w", t, err)
		}
		targets = append(targets, aws.ToString(out.ThingArn))
	}

	expiry := spec.URLExpiry
	if expiry == 0 {
		expiry = 30 * time.Minute // the OTA service's default
	}
	var (
		files  []docFile
		stream []iottypes.StreamFile
	)
	for i, f := range spec.Files {
		digest, size, err := sign.FileDigest(ctx, f.LocalPath)
		if err != nil {
			return fmt.Errorf("awsbackend: file %d: %w", i, err)
		}
		sigKey, sig, err := signFile(f, digest)
		if err != nil {
			return fmt.Errorf("awsbackend: file %d: %w", i, err)
		}
		key := b.objectKey(spec.JobID, i, f.LocalPath)
		version, err := b.upload(ctx, key, f.LocalPath, size)
		if err != nil {
			return fmt.Errorf("awsbackend: file %d: %w", i, err)
		}
		df := docFile{
			DevicePath: f.DevicePath, Size: size, FileID: f.FileID, FileType: f.FileType,
			CertName: f.CertName, SigKey: sigKey, Signature: sig,
		}
		if httpProto {
			if df.URL, err = b.fileURL(ctx, key, expiry); err != nil {
				return fmt.Errorf("awsbackend: file %d: %w", i, err)
			}
		}
		files = append(files, df)
		stream = append(stream, iottypes.StreamFile{
			FileId:     aws.Int32(int32(f.FileID)),
			S3Location: &iottypes.S3Location{Bucket: aws.String(b.opts.Bucket), Key: aws.String(key), Version: version},
		})
	}

	var streamName string
	if mqtt {
		streamName = streamID(spec.JobID)
		in := &iot.CreateStreamInput{
			StreamId:    aws.String(streamName),
			Files:       stream,
			RoleArn:     aws.String(b.opts.ServiceRoleARN),
			Description: aws.String("gwota end-to-end test " + spec.JobID),
		}
		b.track(resource{"stream", streamName})
		_, err := b.iot.CreateStream(ctx, in)
		if isAlreadyExists(err) {
			// Our prefix: a stream left by an earlier run that could not clean up.
			b.opts.Logf("awsbackend: replacing leftover stream %s", streamName)
			if _, err = b.iot.DeleteStream(ctx, &iot.DeleteStreamInput{StreamId: aws.String(streamName)}); err == nil {
				_, err = b.iot.CreateStream(ctx, in)
			}
		}
		if err != nil {
			return fmt.Errorf("awsbackend: create stream %s: %w", streamName, err)
		}
		b.opts.Logf("awsbackend: created stream %s", streamName)
	}

	doc, err := buildDocument(spec.Protocols, streamName, files)
	if err != nil {
		return fmt.Errorf("awsbackend: job %s: %w", spec.JobID, err)
	}
	in := &iot.CreateJobInput{
		JobId:           aws.String(spec.JobID),
		Targets:         targets,
		Document:        aws.String(doc),
		TargetSelection: iottypes.TargetSelectionSnapshot,
		Description:     aws.String("gwota end-to-end test"),
	}
	if httpProto && b.opts.ServiceRoleARN != "" {
		in.PresignedUrlConfig = &iottypes.PresignedUrlConfig{
			RoleArn:      aws.String(b.opts.ServiceRoleARN),
			ExpiresInSec: aws.Int64(int64(expiry / time.Second)),
		}
	}
	job := resource{"job", spec.JobID}
	added := b.track(job)
	_, err = b.iot.CreateJob(ctx, in)
	if isAlreadyExists(err) && b.waitJobGone(ctx, spec.JobID) == nil {
		// The previous run's job with this id was still being deleted.
		_, err = b.iot.CreateJob(ctx, in)
	}
	if err != nil {
		if isAlreadyExists(err) {
			if added {
				b.untrack(job) // someone else's job: never delete it
			}
			err = fmt.Errorf("%w (left by an earlier run? delete it or use another job id)", err)
		}
		return fmt.Errorf("awsbackend: create job %s: %w", spec.JobID, err)
	}
	b.opts.Logf("awsbackend: created job %s", spec.JobID)

	// Executions are created asynchronously; the test expects a QUEUED execution to exist.
	for _, t := range things {
		if err := b.waitExecution(ctx, spec.JobID, t); err != nil {
			return err
		}
	}
	return nil
}

func (b *Backend) validate(spec backend.JobSpec) error {
	if !jobIDRe.MatchString(spec.JobID) {
		return fmt.Errorf("awsbackend: invalid job id %q (1..64 of [a-zA-Z0-9_-])", spec.JobID)
	}
	if len(spec.Protocols) == 0 {
		return errors.New("awsbackend: job has no protocol")
	}
	for _, p := range spec.Protocols {
		if p != backend.ProtocolMQTT && p != backend.ProtocolHTTP {
			return fmt.Errorf("awsbackend: unknown protocol %q", p)
		}
	}
	if slices.Contains(spec.Protocols, backend.ProtocolMQTT) && b.opts.ServiceRoleARN == "" {
		return fmt.Errorf("awsbackend: MQTT jobs need a stream, and streams need %s", EnvServiceRoleARN)
	}
	if len(spec.Files) == 0 {
		return errors.New("awsbackend: job has no file")
	}
	ids := map[int]bool{}
	for i, f := range spec.Files {
		if f.FileID < 0 || f.FileID > 255 {
			return fmt.Errorf("awsbackend: file %d: file id %d outside 0..255", i, f.FileID)
		}
		if ids[f.FileID] {
			return fmt.Errorf("awsbackend: file %d: duplicate file id %d", i, f.FileID)
		}
		ids[f.FileID] = true
	}
	for _, t := range spec.Things {
		if !thingRe.MatchString(t) {
			return fmt.Errorf("awsbackend: invalid thing name %q", t)
		}
	}
	if spec.URLExpiry != 0 && (spec.URLExpiry < time.Minute || spec.URLExpiry > time.Hour) {
		return fmt.Errorf("awsbackend: URL expiry %v outside 60..3600 s", spec.URLExpiry)
	}
	return nil
}

// upload streams the file to S3 (the SDK reads it from disk; nothing is buffered whole) and
// returns the object version when the bucket is versioned.
func (b *Backend) upload(ctx context.Context, key, localPath string, size int64) (*string, error) {
	f, err := os.Open(localPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b.track(resource{"object", key})
	out, err := b.s3.PutObject(ctx, &s3.PutObjectInput{
		Bucket:        aws.String(b.opts.Bucket),
		Key:           aws.String(key),
		Body:          f,
		ContentLength: aws.Int64(size),
		ContentType:   aws.String("application/octet-stream"),
	})
	if err != nil {
		return nil, fmt.Errorf("upload s3://%s/%s: %w", b.opts.Bucket, key, err)
	}
	b.opts.Logf("awsbackend: uploaded s3://%s/%s", b.opts.Bucket, key)
	return out.VersionId, nil
}

// presignedPlaceholder is the Jobs placeholder AWS IoT replaces with a freshly presigned URL
// whenever a device requests the job document.
func (b *Backend) presignedPlaceholder(key string) string {
	return fmt.Sprintf("${aws:iot:s3-presigned-url-v2:https://s3.%s.amazonaws.com/%s/%s}", b.opts.Region, b.opts.Bucket, escapeKey(key))
}

func (b *Backend) fileURL(ctx context.Context, key string, expiry time.Duration) (string, error) {
	if b.opts.ServiceRoleARN != "" {
		return b.presignedPlaceholder(key), nil
	}
	req, err := b.presign.PresignGetObject(ctx, &s3.GetObjectInput{
		Bucket: aws.String(b.opts.Bucket),
		Key:    aws.String(key),
	}, s3.WithPresignExpires(expiry))
	if err != nil {
		return "", fmt.Errorf("presign s3://%s/%s: %w", b.opts.Bucket, key, err)
	}
	return req.URL, nil
}

// waitExecution polls until the execution of jobID on thing exists.
func (b *Backend) waitExecution(ctx context.Context, jobID, thing string) error {
	bo := b.backoff()
	for {
		_, err := b.iot.DescribeJobExecution(ctx, &iot.DescribeJobExecutionInput{
			JobId: aws.String(jobID), ThingName: aws.String(thing),
		})
		if err == nil {
			return nil
		}
		if !isNotFound(err) {
			return fmt.Errorf("awsbackend: execution of %s on %s: %w", jobID, thing, err)
		}
		if err := bo.wait(ctx); err != nil {
			return fmt.Errorf("awsbackend: execution of %s on %s never appeared: %w", jobID, thing, err)
		}
	}
}

// waitJobGone waits while jobID is being deleted; it returns an error at once when the job
// exists in any other state (it is not ours to remove).
func (b *Backend) waitJobGone(ctx context.Context, jobID string) error {
	bo := b.backoff()
	for {
		out, err := b.iot.DescribeJob(ctx, &iot.DescribeJobInput{JobId: aws.String(jobID)})
		if isNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		if out.Job == nil || out.Job.Status != iottypes.JobStatusDeletionInProgress {
			return errors.New("job exists")
		}
		if err := bo.wait(ctx); err != nil {
			return err
		}
	}
}

func (b *Backend) CancelJob(ctx context.Context, jobID string, force bool) error {
	if err := b.checkOpen(); err != nil {
		return err
	}
	_, err := b.iot.CancelJob(ctx, &iot.CancelJobInput{JobId: aws.String(jobID), Force: force})
	if err != nil {
		return fmt.Errorf("awsbackend: cancel job %s: %w", jobID, err)
	}
	return nil
}

func (b *Backend) DeleteJob(ctx context.Context, jobID string, force bool) error {
	if err := b.checkOpen(); err != nil {
		return err
	}
	if _, err := b.iot.DeleteJob(ctx, &iot.DeleteJobInput{JobId: aws.String(jobID), Force: force}); err != nil {
		return fmt.Errorf("awsbackend: delete job %s: %w", jobID, err)
	}
	b.untrack(resource{"job", jobID})
	return nil
}

// Describe reads the default thing's execution of jobID and records it for Updates.
func (b *Backend) Describe(ctx context.Context, jobID string) (backend.Execution, error) {
	out, err := b.iot.DescribeJobExecution(ctx, &iot.DescribeJobExecutionInput{
		JobId: aws.String(jobID), ThingName: aws.String(b.opts.Thing),
	})
	if err != nil {
		return backend.Execution{}, fmt.Errorf("awsbackend: describe %s on %s: %w", jobID, b.opts.Thing, err)
	}
	if out.Execution == nil {
		return backend.Execution{}, fmt.Errorf("awsbackend: describe %s on %s: empty response", jobID, b.opts.Thing)
	}
	e := out.Execution
	ex := backend.Execution{
		JobID:           aws.ToString(e.JobId),
		ThingName:       b.opts.Thing,
		Status:          string(e.Status),
		VersionNumber:   e.VersionNumber,
		ExecutionNumber: aws.ToInt64(e.ExecutionNumber),
	}
	if ex.JobID == "" {
		ex.JobID = jobID
	}
	if e.StatusDetails != nil && len(e.StatusDetails.DetailsMap) > 0 {
		ex.StatusDetails = e.StatusDetails.DetailsMap
	}
	at := aws.ToTime(e.LastUpdatedAt)
	if at.IsZero() {
		at = time.Now()
	}
	b.observe(jobID, ex, at)
	return ex, nil
}

// deviceStatus: statuses a device sets, i.e. those that can be an accepted update.
var deviceStatus = map[string]bool{
	backend.StatusInProgress: true, backend.StatusSucceeded: true,
	backend.StatusFailed: true, backend.StatusRejected: true,
}

// observe records ex as an update when it is a device-set state that differs from the last one
// recorded; reads older than the last recorded version are ignored.
func (b *Backend) observe(jobID string, ex backend.Execution, at time.Time) {
	if !deviceStatus[ex.Status] {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if ex.VersionNumber < b.lastVer[jobID] {
		return
	}
	b.lastVer[jobID] = ex.VersionNumber
	ups := b.observed[jobID]
	if n := len(ups); n > 0 && ups[n-1].Status == ex.Status && maps.Equal(ups[n-1].StatusDetails, ex.StatusDetails) {
		return
	}
	b.observed[jobID] = append(ups, backend.Update{At: at, Status: ex.Status, StatusDetails: maps.Clone(ex.StatusDetails)})
}

// ErrTerminal is returned by WaitStatus when the execution ended in a status not waited for.
var ErrTerminal = errors.New("execution reached a terminal status")

var terminal = map[string]bool{
	backend.StatusSucceeded: true, backend.StatusFailed: true, backend.StatusRejected: true,
	backend.StatusTimedOut: true, backend.StatusRemoved: true, backend.StatusCanceled: true,
}

// WaitStatus polls DescribeJobExecution with backoff (reset whenever the execution changes)
// until the status is one of statuses. A terminal status that is not wanted ends the wait
// early with ErrTerminal, since it can never change again.
func (b *Backend) WaitStatus(ctx context.Context, jobID string, statuses ...string) (backend.Execution, error) {
	if len(statuses) == 0 {
		return backend.Execution{}, errors.New("awsbackend: WaitStatus needs at least one status")
	}
	bo := b.backoff()
	var last backend.Execution
	lastVer := int64(-1)
	for {
		ex, err := b.Describe(ctx, jobID)
		switch {
		case err == nil:
			last = ex
			if slices.Contains(statuses, ex.Status) {
				return ex, nil
			}
			if terminal[ex.Status] {
				return ex, fmt.Errorf("awsbackend: %s on %s is %s %v, waited for %v: %w",
					jobID, b.opts.Thing, ex.Status, ex.StatusDetails, statuses, ErrTerminal)
			}
			if ex.VersionNumber != lastVer {
				lastVer = ex.VersionNumber
				bo.reset()
			}
		case isNotFound(err):
			// Not created yet, or deleted: keep waiting until ctx says otherwise.
		default:
			return last, b.waitErr(jobID, statuses, last, err)
		}
		if err := bo.wait(ctx); err != nil {
			return last, b.waitErr(jobID, statuses, last, err)
		}
	}
}

func (b *Backend) waitErr(jobID string, statuses []string, last backend.Execution, err error) error {
	return fmt.Errorf("awsbackend: waiting for %s on %s to reach %v (last %q %v): %w",
		jobID, b.opts.Thing, statuses, last.Status, last.StatusDetails, err)
}

// Updates returns the distinct device-set (status, statusDetails) observed by Describe and
// WaitStatus for jobID, oldest first. Polling can miss short-lived states.
func (b *Backend) Updates(jobID string) []backend.Update {
	b.mu.Lock()
	defer b.mu.Unlock()
	ups := b.observed[jobID]
	out := make([]backend.Update, len(ups))
	for i, u := range ups {
		out[i] = u
		out[i].StatusDetails = maps.Clone(u.StatusDetails)
	}
	return out
}

// Close removes everything this backend created, newest first: jobs (forced, so IN_PROGRESS
// executions go too), streams, then S3 objects. Resources already gone are not errors. It uses
// its own deadline, not a test's context, so it works from t.Cleanup after a failure or a
// panic; later calls return the first call's result.
func (b *Backend) Close() error {
	b.mu.Lock()
	if b.closed {
		defer b.mu.Unlock()
		return b.closeErr
	}
	b.closed = true
	todo := slices.Clone(b.created)
	b.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), b.opts.CloseTimeout)
	defer cancel()
	var errs []error
	for i := len(todo) - 1; i >= 0; i-- {
		r := todo[i]
		var err error
		switch r.kind {
		case "job":
			_, err = b.iot.DeleteJob(ctx, &iot.DeleteJobInput{JobId: aws.String(r.id), Force: true})
		case "stream":
			_, err = b.iot.DeleteStream(ctx, &iot.DeleteStreamInput{StreamId: aws.String(r.id)})
		case "object":
			_, err = b.s3.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(b.opts.Bucket), Key: aws.String(r.id)})
		}
		if err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("awsbackend: remove %s %s: %w", r.kind, r.id, err))
			continue
		}
		b.opts.Logf("awsbackend: removed %s %s", r.kind, r.id)
	}
	b.closeIdle()

	b.mu.Lock()
	defer b.mu.Unlock()
	b.created = nil
	b.closeErr = errors.Join(errs...)
	return b.closeErr
}

func (b *Backend) closeIdle() { b.httpc.CloseIdleConnections() }

func isNotFound(err error) bool {
	var nf *iottypes.ResourceNotFoundException
	if errors.As(err, &nf) {
		return true
	}
	var re *smithyhttp.ResponseError
	return errors.As(err, &re) && re.HTTPStatusCode() == http.StatusNotFound
}

func isAlreadyExists(err error) bool {
	var ae *iottypes.ResourceAlreadyExistsException
	return errors.As(err, &ae)
}

func isInvalidState(err error) bool {
	var is *iottypes.InvalidStateTransitionException
	return errors.As(err, &is)
}

// backoff doubles the poll interval from PollMin up to PollMax.
type backoff struct {
	min, max, cur time.Duration
}

func (b *Backend) backoff() *backoff {
	return &backoff{min: b.opts.PollMin, max: b.opts.PollMax, cur: b.opts.PollMin}
}

func (bo *backoff) reset() { bo.cur = bo.min }

func (bo *backoff) wait(ctx context.Context) error {
	t := time.NewTimer(bo.cur)
	defer t.Stop()
	bo.cur = min(2*bo.cur, bo.max)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
