package emulator

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

const amzDate = "20060102T150405Z"

// presign builds an S3-style presigned URL for one file of a job. The lifetime is the job's,
// cut short by an ExpireURLAfter fault.
func (e *Emulator) presign(j *job, fileID int, now time.Time) string {
	expiry := j.urlExpiry
	if f := e.faultsLocked(j.id); f != nil && f.ExpireURLAfter > 0 && f.ExpireURLAfter < expiry {
		expiry = f.ExpireURLAfter
	}
	secs := int64(expiry / time.Second)
	path := fmt.Sprintf("/ota/%s/%d", j.id, fileID)
	date := now.UTC().Format(amzDate)
	return fmt.Sprintf("%s%s?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=%s&X-Amz-Expires=%d&X-Amz-SignedHeaders=host&X-Amz-Signature=%s",
		e.httpBase, path, date, secs, e.urlSignature(path, date, secs))
}

func (e *Emulator) urlSignature(path, date string, secs int64) string {
	m := hmac.New(sha256.New, e.urlKey)
	fmt.Fprintf(m, "%s\n%s\n%d", path, date, secs)
	return hex.EncodeToString(m.Sum(nil))
}

// s3Error answers like S3 does: an XML body with a code.
func s3Error(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>", code, msg)
}

func (e *Emulator) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		s3Error(w, http.StatusMethodNotAllowed, "MethodNotAllowed", "The specified method is not allowed against this resource.")
		return
	}
	q := r.URL.Query()
	date, expStr, sig := q.Get("X-Amz-Date"), q.Get("X-Amz-Expires"), q.Get("X-Amz-Signature")
	secs, err := strconv.ParseInt(expStr, 10, 64)
	signed, derr := time.Parse(amzDate, date)
	if date == "" || sig == "" || err != nil || derr != nil {
		s3Error(w, http.StatusForbidden, "AccessDenied", "Query-string authentication requires the X-Amz-Date, X-Amz-Expires and X-Amz-Signature parameters")
		return
	}
	if !hmac.Equal([]byte(sig), []byte(e.urlSignature(r.URL.Path, date, secs))) {
		s3Error(w, http.StatusForbidden, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided.")
		return
	}
	if !time.Now().Before(signed.Add(time.Duration(secs) * time.Second)) {
		if parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/"); len(parts) == 3 {
			e.mu.Lock()
			e.httpRanges[parts[1]] = append(e.httpRanges[parts[1]], "expired")
			e.mu.Unlock()
		}
		s3Error(w, http.StatusForbidden, "AccessDenied", "Request has expired")
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	if len(parts) != 3 || parts[0] != "ota" {
		s3Error(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	}
	fileID, err := strconv.Atoi(parts[2])
	e.mu.Lock()
	j := e.jobs[parts[1]]
	var file *jobFile
	if j != nil && err == nil {
		for _, f := range j.files {
			if f.spec.FileID == fileID {
				file = f
			}
		}
	}
	var delay time.Duration
	if f := e.faultsLocked(parts[1]); f != nil {
		delay = f.Delay
	}
	e.mu.Unlock()
	if file == nil {
		s3Error(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	}
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("ETag", `"`+j.id+"-"+strconv.Itoa(fileID)+`"`)
	// ServeContent handles Range and copies from the file in small chunks.
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", time.Time{}, io.NewSectionReader(file.f, 0, file.size))
	e.mu.Lock()
	e.httpBytes[parts[1]] += cw.n
	e.httpRanges[parts[1]] = append(e.httpRanges[parts[1]], r.Header.Get("Range"))
	e.mu.Unlock()
}

// HTTPRanges lists the Range header of every GET served for a job, in order ("" when the
// request had none: the whole file; "expired" for a GET refused because its URL expired).
func (e *Emulator) HTTPRanges(jobID string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.httpRanges[jobID]...)
}

// countingWriter counts the body bytes a response wrote (what the device was sent).
type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

// HTTPBytes is the number of file bytes the presigned-URL server wrote for a job (what it
// handed to the network; a link that breaks loses part of it).
func (e *Emulator) HTTPBytes(jobID string) int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.httpBytes[jobID]
}

// SetHTTPURL makes presigned URLs name base (for example a proxy in front of the file
// server, "http://127.0.0.1:1234") instead of the server's own address.
func (e *Emulator) SetHTTPURL(base string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.httpBase = base
}
