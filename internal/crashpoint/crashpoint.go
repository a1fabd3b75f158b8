// Package crashpoint lets the crash campaign (test/crash) kill a real ota-writer or ota-net
// process with SIGKILL at a named point of an update: during read-back verification, between
// verification and activation, inside activation, around the self-test, inside commit...
// Points a timer cannot hit reliably.
//
// In a normal build Hit is an empty function the compiler removes: production binaries carry
// no crash hook. Binaries built with the build tag gwota_crashpoints read two variables:
//
//	GWOTA_CRASHPOINT       name of the point, optionally "#n" for its n-th hit (default 1)
//	GWOTA_CRASHPOINT_FILE  a file created (O_EXCL) just before the kill
//
// The file makes a point fire once per device run, whatever restarts follow, and tells the
// campaign which process died where.
package crashpoint

// Names of the points, shared by the product and the campaign.
const (
	// ota-writer
	WriterBlock         = "writer.block"          // a block written, before it is synced
	WriterVerify        = "writer.verify"         // halfway through the read-back
	WriterVerified      = "writer.verified"       // verified and recorded, before Finish answers
	WriterActivateBoot  = "writer.activate.boot"  // before the boot backend switches
	WriterActivateSaved = "writer.activate.saved" // the boot switched, the record not yet saved
	WriterSelfTest      = "writer.selftest"       // in the trial boot, before the checks run
	WriterSelfTested    = "writer.selftested"     // the checks passed, before the answer
	WriterCommitBoot    = "writer.commit.boot"    // before the boot backend commits
	WriterCommitSaved   = "writer.commit.saved"   // committed, the record not yet saved
	// A block of a delta update's local fill written, before the fill is synced. Not in
	// Points: the campaign's updates carry no manifest; writer/engine's delta tests kill a
	// writer there.
	WriterFill = "writer.fill"

	// ota-net
	NetBlock    = "net.block"    // a downloaded block handed to the writer
	NetReported = "net.reported" // a job status update published, its answer not yet read
	NetTested   = "net.tested"   // the self-test passed, before Commit is asked
)

// Points lists every point, for the campaign's coverage check.
var Points = []string{
	WriterBlock, WriterVerify, WriterVerified, WriterActivateBoot, WriterActivateSaved,
	WriterSelfTest, WriterSelfTested, WriterCommitBoot, WriterCommitSaved,
	NetBlock, NetReported, NetTested,
}
