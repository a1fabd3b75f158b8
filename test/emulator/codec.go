package emulator

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/fxamacker/cbor/v2"
)

// Wire formats of AWS IoT MQTT-based file delivery (docs/PROTOCOL.md section 2). They are exported so
// that tests can build requests byte for byte; the device side has its own codec.

// Stream payload formats, named by the topic suffix.
const (
	FormatCBOR = "cbor"
	FormatJSON = "json"
)

// GetStreamRequest is a GetStream request. Pointers tell "absent" from zero; the field order is
// the encoding order (the docs/PROTOCOL.md vector encodes c, f, l, o, b in that order).
type GetStreamRequest struct {
	ClientToken   *string `cbor:"c,omitempty" json:"c,omitempty"`
	StreamVersion *int64  `cbor:"s,omitempty" json:"s,omitempty"`
	FileID        *int64  `cbor:"f,omitempty" json:"f,omitempty"`
	BlockSize     *int64  `cbor:"l,omitempty" json:"l,omitempty"`
	Offset        *int64  `cbor:"o,omitempty" json:"o,omitempty"`
	NumBlocks     *int64  `cbor:"n,omitempty" json:"n,omitempty"`
	Bitmap        []byte  `cbor:"b,omitempty" json:"-"`
}

// jsonGetStreamRequest differs only in the bitmap, which JSON carries as a "0x..." hex string.
type jsonGetStreamRequest struct {
	ClientToken   *string `json:"c,omitempty"`
	StreamVersion *int64  `json:"s,omitempty"`
	FileID        *int64  `json:"f,omitempty"`
	BlockSize     *int64  `json:"l,omitempty"`
	Offset        *int64  `json:"o,omitempty"`
	NumBlocks     *int64  `json:"n,omitempty"`
	Bitmap        *string `json:"b,omitempty"`
}

// DataBlock is one GetStream response message.
type DataBlock struct {
	ClientToken string `cbor:"c,omitempty" json:"c,omitempty"`
	FileID      int64  `cbor:"f" json:"f"`
	BlockID     int64  `cbor:"i" json:"i"`
	Length      int64  `cbor:"l" json:"l"`
	Payload     []byte `cbor:"p" json:"p"` // encoding/json writes []byte as base64, as AWS does
}

// StreamError is the body published on .../streams/{id}/rejected/{fmt}.
type StreamError struct {
	Code        string `cbor:"o" json:"o"`
	Message     string `cbor:"m,omitempty" json:"m,omitempty"`
	ClientToken string `cbor:"c,omitempty" json:"c,omitempty"`
}

// DescribeStreamRequest is the (optional) body of a DescribeStream request.
type DescribeStreamRequest struct {
	ClientToken *string `cbor:"c,omitempty" json:"c,omitempty"`
}

// StreamFile is one entry of a DescribeStream response.
type StreamFile struct {
	FileID int64 `cbor:"f" json:"f"`
	Size   int64 `cbor:"z" json:"z"`
}

// DescribeStreamResponse is published on .../streams/{id}/description/{fmt}.
type DescribeStreamResponse struct {
	ClientToken string       `cbor:"c,omitempty" json:"c,omitempty"`
	Version     int64        `cbor:"s" json:"s"`
	Description string       `cbor:"d,omitempty" json:"d,omitempty"`
	Files       []StreamFile `cbor:"r" json:"r"`
}

// Stream error codes (docs/PROTOCOL.md section 2).
const (
	StreamInvalidTopic            = "InvalidTopic"
	StreamInvalidJSON             = "InvalidJson"
	StreamInvalidCBOR             = "InvalidCbor"
	StreamInvalidRequest          = "InvalidRequest"
	StreamUnauthorized            = "Unauthorized"
	StreamBlockSizeOutOfBounds    = "BlockSizeOutOfBounds"
	StreamOffsetOutOfBounds       = "OffsetOutOfBounds"
	StreamBlockCountLimitExceeded = "BlockCountLimitExceeded"
	StreamBlockBitmapLimit        = "BlockBitmapLimitExceeded"
	StreamResourceNotFound        = "ResourceNotFound"
	StreamVersionMismatch         = "VersionMismatch"
	StreamETagMismatch            = "ETagMismatch"
	StreamInternalError           = "InternalError"
)

var (
	// Definite-length maps, fields in struct order: the request vector of docs/PROTOCOL.md.
	cborEnc = func() cbor.EncMode {
		em, err := cbor.EncOptions{Sort: cbor.SortNone, IndefLength: cbor.IndefLengthForbidden}.EncMode()
		if err != nil {
			panic(err)
		}
		return em
	}()
	// Indefinite-length maps are legal CBOR and must be accepted.
	cborDec = func() cbor.DecMode {
		dm, err := cbor.DecOptions{IndefLength: cbor.IndefLengthAllowed}.DecMode()
		if err != nil {
			panic(err)
		}
		return dm
	}()
)

// errSyntax marks a payload that is not well-formed JSON/CBOR (InvalidJson/InvalidCbor), as
// opposed to well-formed data of the wrong shape (InvalidRequest).
var errSyntax = errors.New("malformed payload")

// cborBlockHeader returns a slice of len(header)+n whose first bytes are the CBOR encoding of
// blk with an n-byte payload, up to the payload's bytes: the payload ("p", the last field)
// goes into the last n bytes. blk.Payload is ignored. The result equals Marshal once the
// payload is filled in (codec_test checks it).
func cborBlockHeader(blk DataBlock, n int) ([]byte, error) {
	blk.Payload = []byte{}
	h, err := cborEnc.Marshal(blk)
	if err != nil {
		return nil, err
	}
	if len(h) == 0 || h[len(h)-1] != 0x40 { // an empty byte string ends the map
		return nil, fmt.Errorf("unexpected CBOR block encoding % x", h)
	}
	h = h[:len(h)-1]
	out := make([]byte, len(h), len(h)+9+n)
	copy(out, h)
	switch {
	case n < 24:
		out = append(out, 0x40|byte(n))
	case n <= 0xff:
		out = append(out, 0x58, byte(n))
	case n <= 0xffff:
		out = append(out, 0x59, byte(n>>8), byte(n))
	case int64(n) <= 0xffffffff:
		out = append(out, 0x5a, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	default:
		return nil, fmt.Errorf("block of %d bytes", n)
	}
	return out[:len(out)+n], nil
}

// Marshal encodes v in the given stream format.
func Marshal(format string, v any) ([]byte, error) {
	if format == FormatJSON {
		if r, ok := v.(GetStreamRequest); ok {
			return json.Marshal(r.toJSON())
		}
		return json.Marshal(v)
	}
	return cborEnc.Marshal(v)
}

func (r GetStreamRequest) toJSON() jsonGetStreamRequest {
	j := jsonGetStreamRequest{r.ClientToken, r.StreamVersion, r.FileID, r.BlockSize, r.Offset, r.NumBlocks, nil}
	if r.Bitmap != nil {
		s := BitmapHex(r.Bitmap)
		j.Bitmap = &s
	}
	return j
}

// DecodeGetStreamRequest decodes a request body. An error wrapping errSyntax means the body is
// not well-formed; any other error means it has the wrong shape.
func DecodeGetStreamRequest(format string, b []byte) (GetStreamRequest, error) {
	var r GetStreamRequest
	if format == FormatJSON {
		var j jsonGetStreamRequest
		if err := decodeJSON(b, &j); err != nil {
			return r, err
		}
		r = GetStreamRequest{j.ClientToken, j.StreamVersion, j.FileID, j.BlockSize, j.Offset, j.NumBlocks, nil}
		if j.Bitmap != nil {
			bm, err := ParseBitmapHex(*j.Bitmap)
			if err != nil {
				return r, err
			}
			r.Bitmap = bm
		}
		return r, nil
	}
	return r, decodeCBOR(b, &r)
}

// DecodeDataBlock decodes a block message (definite or indefinite-length map).
func DecodeDataBlock(format string, b []byte) (DataBlock, error) {
	var d DataBlock
	if format == FormatJSON {
		return d, decodeJSON(b, &d)
	}
	return d, decodeCBOR(b, &d)
}

// DecodeStreamError decodes a rejected body.
func DecodeStreamError(format string, b []byte) (StreamError, error) {
	var e StreamError
	if format == FormatJSON {
		return e, decodeJSON(b, &e)
	}
	return e, decodeCBOR(b, &e)
}

// DecodeDescribeStreamResponse decodes a description body.
func DecodeDescribeStreamResponse(format string, b []byte) (DescribeStreamResponse, error) {
	var d DescribeStreamResponse
	if format == FormatJSON {
		return d, decodeJSON(b, &d)
	}
	return d, decodeCBOR(b, &d)
}

func decodeCBOR(b []byte, v any) error {
	if err := cbor.Wellformed(b); err != nil {
		return fmt.Errorf("%w: %v", errSyntax, err)
	}
	if err := cborDec.Unmarshal(b, v); err != nil {
		return fmt.Errorf("cbor: %w", err)
	}
	return nil
}

func decodeJSON(b []byte, v any) error {
	if !json.Valid(b) {
		return fmt.Errorf("%w: invalid JSON", errSyntax)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("json: %w", err)
	}
	return nil
}

// BitmapFor returns the bitmap that asks for blocks relative to offset: bit k is block offset+k,
// byte k>>3, mask 1<<(k&7). size is the bitmap length in bytes (0: just long enough).
func BitmapFor(offset int, blocks []int, size int) []byte {
	max := -1
	for _, b := range blocks {
		if b-offset > max {
			max = b - offset
		}
	}
	if n := max/8 + 1; size < n {
		size = n
	}
	bm := make([]byte, size)
	for _, b := range blocks {
		k := b - offset
		if k < 0 {
			continue
		}
		bm[k>>3] |= 1 << (k & 7)
	}
	return bm
}

// BitmapBlocks lists the blocks a bitmap asks for, in increasing order.
func BitmapBlocks(offset int, bm []byte) []int {
	var out []int
	for k := 0; k < len(bm)*8; k++ {
		if bm[k>>3]&(1<<(k&7)) != 0 {
			out = append(out, offset+k)
		}
	}
	return out
}

// BitmapHex is the JSON form of a bitmap: "0x" and lower-case hex, trailing zero bytes dropped
// (docs/PROTOCOL.md: bytes 13 00 80 00 are "0x130080").
func BitmapHex(bm []byte) string {
	n := len(bm)
	for n > 1 && bm[n-1] == 0 {
		n--
	}
	return "0x" + hex.EncodeToString(bm[:n])
}

// ParseBitmapHex parses the JSON bitmap form, with or without the 0x prefix.
func ParseBitmapHex(s string) ([]byte, error) {
	h := strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
	if len(h)%2 == 1 {
		// Byte 0 comes first, so a lone nibble has no single meaning: refuse it.
		return nil, fmt.Errorf("bitmap %q: odd number of hex digits", s)
	}
	bm, err := hex.DecodeString(h)
	if err != nil {
		return nil, fmt.Errorf("bitmap %q: %w", s, err)
	}
	return bm, nil
}
