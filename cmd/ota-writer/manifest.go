package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"

	"github.com/gwota/gwota/writer/manifest"
)

// cmdManifest is the publisher's side of a delta update: it reads an image once and writes
// its manifest and its chunk file (docs/MANIFEST.md). With --key it signs the manifest the way
// an OTA file is signed (ECDSA P-256 over the file's SHA-256, DER), otherwise it prints the
// digest to sign elsewhere (an HSM, a signing service). The chunk file is never signed: every
// block in it is checked against the signed manifest, and a writer that would take it for an
// image refuses it unsigned.
func cmdManifest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("manifest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	image := fs.String("image", "", "image `file` to publish (required)")
	version := fs.String("version", "", "the image's `version`, signed: what the version policy compares (required)")
	target := fs.String("target", "", "writer target `name` the image is for (required)")
	compatible := fs.String("compatible", "", "compatible `string` of the boards that may install it (required)")
	blockSize := fs.Uint("block-size", 4096, "block `size`: the file system's block (ext4: 4096)")
	chunkSize := fs.Uint("chunk-size", manifest.DefaultChunkSize, "image `bytes` per compressed chunk, a multiple of --block-size")
	base := fs.String("base", "", "optional delta base image `file` (what most devices run): its SHA-256 is recorded, blocks it lacks go to chunks of their own, and those chunks get delta chunks compressed against ranges of it")
	dictSize := fs.Int("dict-size", manifest.MaxDictSize, "with --base: largest dictionary of a delta chunk in `bytes` (at most the default; 0: no delta chunks)")
	level := fs.String("level", "better", "zstd `level`: fastest, default, better or best (chunks about 3 % smaller, about 60 MiB of memory instead of 23)")
	maxChunk := fs.Uint("max-chunk-bytes", manifest.DefaultMaxChunkBytes, "compressed `bytes` of a chunk at most: the writer's max_block_size must be at least this")
	key := fs.String("key", "", "ECDSA P-256 private key `file` (PEM) to sign the manifest with")
	out := fs.String("o", "", "manifest output `file` (required)")
	chunks := fs.String("chunks", "", "chunk file output `file` (required)")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if *image == "" || *version == "" || *target == "" || *compatible == "" || *out == "" || *chunks == "" || fs.NArg() != 0 {
		return usagef("manifest: --image, --version, --target, --compatible, -o and --chunks are required")
	}
	if *blockSize > 1<<20 || *chunkSize > 1<<30 || *maxChunk > 1<<30 {
		return usagef("manifest: --block-size or --chunk-size too large")
	}
	ok, lv := zstd.EncoderLevelFromString(*level)
	if !ok {
		return usagef("manifest: --level %q: fastest, default, better or best", *level)
	}
	var signer *ecdsa.PrivateKey
	if *key != "" {
		k, err := loadECKey(*key)
		if err != nil {
			return usagef("manifest: --key: %v", err)
		}
		signer = k
	}
	p := manifest.Params{Target: *target, Compatible: *compatible, Version: *version,
		BlockSize: uint32(*blockSize), ChunkSize: uint32(*chunkSize), Level: lv,
		MaxChunkBytes: uint32(*maxChunk)}
	if *base != "" {
		sum, err := fileSHA256(*base)
		if err != nil {
			return usagef("manifest: --base: %v", err)
		}
		bf, err := os.Open(*base)
		if err != nil {
			return usagef("manifest: --base: %v", err)
		}
		defer bf.Close()
		fi, err := bf.Stat()
		if err != nil {
			return usagef("manifest: --base: %v", err)
		}
		p.BaseSHA256, p.Base, p.BaseSize = sum, bf, fi.Size()
		if *dictSize <= 0 {
			p.DictSize = -1
		} else {
			p.DictSize = *dictSize
		}
	}
	img, err := os.Open(*image)
	if err != nil {
		return usagef("manifest: %v", err)
	}
	defer img.Close()
	mf, err := os.Create(*out)
	if err != nil {
		return usagef("manifest: %v", err)
	}
	cf, err := os.Create(*chunks)
	if err != nil {
		mf.Close()
		os.Remove(*out)
		return usagef("manifest: %v", err)
	}
	res, err := manifest.Build(ctx, img, p, cf, mf)
	for _, f := range []*os.File{mf, cf} {
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		os.Remove(*out)
		os.Remove(*chunks)
		if errors.Is(err, context.Canceled) {
			return err
		}
		return usagef("manifest: %v", err)
	}
	fmt.Fprintf(stdout, "manifest: %s (%d bytes): target %s, compatible %s, version %s, %d bytes in %d blocks of %d (%d all zeros)\n",
		*out, res.ManifestSize, *target, *compatible, *version, res.ImageSize, res.Blocks, *blockSize, res.ZeroBlocks)
	fmt.Fprintf(stdout, "chunks: %s (%d bytes): %d chunks of %d image bytes, zstd\n", *chunks, res.ChunkFileSize, res.Chunks, *chunkSize)
	if res.Deltas > 0 {
		fmt.Fprintf(stdout, "delta chunks: %d (%d bytes), for devices on the base\n", res.Deltas, res.DeltaBytes)
	}
	fmt.Fprintf(stdout, "sha256 %s: %x\n", *out, res.ManifestSHA256)
	if signer == nil {
		return nil
	}
	sig, err := ecdsa.SignASN1(rand.Reader, signer, res.ManifestSHA256)
	if err != nil {
		return err
	}
	if err := os.WriteFile(*out+".sig", sig, 0o644); err != nil {
		return usagef("manifest: %v", err)
	}
	fmt.Fprintf(stdout, "signature %s.sig (sig-sha256-ecdsa): %s\n", *out, base64.StdEncoding.EncodeToString(sig))
	return nil
}

// loadECKey reads an ECDSA P-256 private key in PEM (SEC 1 "EC PRIVATE KEY" as openssl
// ecparam writes it, or PKCS #8 "PRIVATE KEY").
func loadECKey(path string) (*ecdsa.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var blk *pem.Block
		blk, data = pem.Decode(data)
		if blk == nil {
			return nil, errors.New("no PEM private key")
		}
		var k any
		switch blk.Type {
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		default:
			continue // e.g. EC PARAMETERS before the key
		}
		if err != nil {
			return nil, err
		}
		ek, ok := k.(*ecdsa.PrivateKey)
		if !ok || ek.Curve != elliptic.P256() {
			return nil, errors.New("not an ECDSA P-256 key")
		}
		return ek, nil
	}
}

func fileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var h hash.Hash = sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}
