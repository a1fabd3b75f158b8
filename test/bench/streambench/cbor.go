package main

import (
	"github.com/fxamacker/cbor/v2"

	"github.com/gwota/gwota/netagent/stream"
)

func encodeBlock(b stream.Block) ([]byte, error) { return cbor.Marshal(b) }
