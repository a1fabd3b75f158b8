package stream

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/fxamacker/cbor/v2"

	"github.com/gwota/gwota/internal/bitmap"
)

// Wire limits of AWS IoT MQTT-based file delivery (docs/PROTOCOL.md section 2).
const (
	MinBlockSize    = 256
	MaxBlockSize    = 128 * 1024
	MaxRequestBytes = 128 * 1024 // n*l per request
	MaxOffset       = 98304      // largest "o"
	MaxBitmapBytes  = 12288 - 1  // a bitmap must be under 12,288 bytes
	maxTokenLen     = 64
)

// MaxBlocks is the largest block count a stream can serve at any block size: the last block
// reachable is the last bit of the largest bitmap at the largest offset.
const MaxBlocks = MaxOffset + MaxBitmapBytes*8

// Payload formats, named by the topic suffix.
const (
	FormatCBOR = "cbor"
	FormatJSON = "json"
)

// Request is a GetStream request. Fields are encoded in this order (c, s, f, l, o, n, b): the
// docs/PROTOCOL.md vector encodes c, f, l, o, b. Pointers tell "absent" from zero.
type Request struct {
	ClientToken   string `cbor:"c,omitempty"`
	StreamVersion *int64 `cbor:"s,omitempty"`
	FileID        int64  `cbor:"f"`
	BlockSize     int64  `cbor:"l"`
	Offset        int64  `cbor:"o"`
	NumBlocks     int64  `cbor:"n,omitempty"`
	Bitmap        []byte `cbor:"b,omitempty"`
}

type jsonRequest struct {
	ClientToken   string `json:"c,omitempty"`
	StreamVersion *int64 `json:"s,omitempty"`
	FileID        int64  `json:"f"`
	BlockSize     int64  `json:"l"`
	Offset        int64  `json:"o"`
	NumBlocks     int64  `json:"n,omitempty"`
	Bitmap        string `json:"b,omitempty"`
}

// Block is one data message: {"f": file, "i": block, "l": length, "p": payload}.
type Block struct {
	ClientToken string  `cbor:"c,omitempty" json:"c,omitempty"`
	FileID      int64   `cbor:"f" json:"f"`
	Index       int64   `cbor:"i" json:"i"`
	Length      int64   `cbor:"l" json:"l"`
	Payload     payload `cbor:"p" json:"p"` // base64 in JSON, as AWS sends it
}

// payload decodes a CBOR byte string without copying it: the block's data aliases the MQTT
// message, which belongs to the handler (one allocation per message in paho). This halves
// the garbage per block, which is what peak RSS is made of. Indefinite-length byte strings
// (chunks) go through the library and are copied.
type payload []byte

func (p *payload) UnmarshalCBOR(data []byte) error {
	if len(data) > 0 && data[0]>>5 == 2 {
		n, hdr, ok := byteStringHeader(data)
		if ok && uint64(len(data)-hdr) == n {
			*p = data[hdr:len(data):len(data)]
			return nil
		}
	}
	var b []byte
	if err := decMode.Unmarshal(data, &b); err != nil {
		return err
	}
	*p = b
	return nil
}

// byteStringHeader reads a definite-length CBOR byte string header.
func byteStringHeader(d []byte) (n uint64, hdr int, ok bool) {
	info := d[0] & 0x1f
	switch {
	case info < 24:
		return uint64(info), 1, true
	case info == 24 && len(d) >= 2:
		return uint64(d[1]), 2, true
	case info == 25 && len(d) >= 3:
		return uint64(binary.BigEndian.Uint16(d[1:])), 3, true
	case info == 26 && len(d) >= 5:
		return uint64(binary.BigEndian.Uint32(d[1:])), 5, true
	case info == 27 && len(d) >= 9:
		return binary.BigEndian.Uint64(d[1:]), 9, true
	}
	return 0, 0, false
}

func (p payload) MarshalCBOR() ([]byte, error) { return encMode.Marshal([]byte(p)) }

// Rejection is the body of a message on .../rejected/{fmt}.
type Rejection struct {
	Code        string `cbor:"o" json:"o"`
	Message     string `cbor:"m,omitempty" json:"m,omitempty"`
	ClientToken string `cbor:"c,omitempty" json:"c,omitempty"`
}

// Stream error codes (docs/PROTOCOL.md section 2).
const (
	CodeInvalidTopic            = "InvalidTopic"
	CodeInvalidJSON             = "InvalidJson"
	CodeInvalidCBOR             = "InvalidCbor"
	CodeInvalidRequest          = "InvalidRequest"
	CodeUnauthorized            = "Unauthorized"
	CodeBlockSizeOutOfBounds    = "BlockSizeOutOfBounds"
	CodeOffsetOutOfBounds       = "OffsetOutOfBounds"
	CodeBlockCountLimitExceeded = "BlockCountLimitExceeded"
	CodeBlockBitmapLimit        = "BlockBitmapLimitExceeded"
	CodeResourceNotFound        = "ResourceNotFound"
	CodeVersionMismatch         = "VersionMismatch"
	CodeETagMismatch            = "ETagMismatch"
	CodeInternalError           = "InternalError"
)

var (
	// Definite-length maps in struct field order: the request vector of docs/PROTOCOL.md.
	encMode = mustEnc(cbor.EncOptions{Sort: cbor.SortNone, IndefLength: cbor.IndefLengthForbidden})
	// Both definite and indefinite-length maps are legal in responses. Unknown keys are
	// ignored (AWS may add some); duplicate keys are refused, they make a block ambiguous.
	decMode = mustDec(cbor.DecOptions{
		IndefLength:      cbor.IndefLengthAllowed,
		DupMapKey:        cbor.DupMapKeyEnforcedAPF,
		MaxNestedLevels:  4,
		MaxArrayElements: 16,
		MaxMapPairs:      16,
	})
)

func mustEnc(o cbor.EncOptions) cbor.EncMode {
	m, err := o.EncMode()
	if err != nil {
		panic(err)
	}
	return m
}

func mustDec(o cbor.DecOptions) cbor.DecMode {
	m, err := o.DecMode()
	if err != nil {
		panic(err)
	}
	return m
}

// EncodeRequest encodes r for the format.
func EncodeRequest(format string, r Request) ([]byte, error) {
	if len(r.ClientToken) > maxTokenLen {
		return nil, fmt.Errorf("client token of %d bytes, at most %d", len(r.ClientToken), maxTokenLen)
	}
	if len(r.Bitmap) > MaxBitmapBytes {
		return nil, fmt.Errorf("bitmap of %d bytes, must be under %d", len(r.Bitmap), MaxBitmapBytes+1)
	}
	switch format {
	case FormatCBOR:
		return encMode.Marshal(r)
	case FormatJSON:
		j := jsonRequest{r.ClientToken, r.StreamVersion, r.FileID, r.BlockSize, r.Offset, r.NumBlocks, ""}
		if r.Bitmap != nil {
			j.Bitmap = bitmap.Bitmap(r.Bitmap).Hex()
		}
		return json.Marshal(j)
	}
	return nil, fmt.Errorf("unknown stream format %q", format)
}

// ErrMalformed marks a data or rejected message that cannot be decoded.
var ErrMalformed = errors.New("malformed stream message")

// DecodeBlock decodes a data message (CBOR definite or indefinite-length map, or JSON). It
// checks shape only; Validate checks the block against the file.
func DecodeBlock(format string, b []byte) (Block, error) {
	var blk Block
	var err error
	switch format {
	case FormatCBOR:
		err = decMode.Unmarshal(b, &blk)
	case FormatJSON:
		err = json.Unmarshal(b, &blk)
	default:
		err = fmt.Errorf("unknown stream format %q", format)
	}
	if err != nil {
		return Block{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return blk, nil
}

// DecodeRejection decodes a rejected message.
func DecodeRejection(format string, b []byte) (Rejection, error) {
	var r Rejection
	var err error
	switch format {
	case FormatCBOR:
		err = decMode.Unmarshal(b, &r)
	case FormatJSON:
		err = json.Unmarshal(b, &r)
	default:
		err = fmt.Errorf("unknown stream format %q", format)
	}
	if err == nil && r.Code == "" {
		err = errors.New(`no error code ("o")`)
	}
	if err != nil {
		return Rejection{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return r, nil
}

// Validate checks a decoded block against the file it must belong to: file id, index in
// range, declared and actual length exactly the block's size.
func (b Block) Validate(fileID int64, fileSize int64, blockSize int) error {
	total := NumBlocks(fileSize, blockSize)
	switch {
	case b.FileID != fileID:
		return fmt.Errorf("%w: file id %d, want %d", ErrMalformed, b.FileID, fileID)
	case b.Index < 0 || b.Index >= int64(total):
		return fmt.Errorf("%w: block %d outside 0..%d", ErrMalformed, b.Index, total-1)
	}
	want := BlockLen(fileSize, blockSize, int(b.Index))
	switch {
	case b.Length != int64(want):
		return fmt.Errorf("%w: block %d declares %d bytes, want %d", ErrMalformed, b.Index, b.Length, want)
	case len(b.Payload) != want:
		return fmt.Errorf("%w: block %d carries %d bytes, want %d", ErrMalformed, b.Index, len(b.Payload), want)
	}
	return nil
}

// NumBlocks is the number of blocks of a file.
func NumBlocks(fileSize int64, blockSize int) int {
	return int((fileSize + int64(blockSize) - 1) / int64(blockSize))
}

// BlockLen is the length of block i: blockSize, except the last block.
func BlockLen(fileSize int64, blockSize, i int) int {
	off := int64(i) * int64(blockSize)
	if rest := fileSize - off; rest < int64(blockSize) {
		return int(rest)
	}
	return blockSize
}
