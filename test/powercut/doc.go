// Package powercut is the power-cut campaign: the real ota-writer process runs with its state
// directory (journal, file boot backend state) and its file-backed A/B slots on a lazy FUSE
// file system (test/lazyfs) that loses everything not synced when the power is cut. A test
// client drives two updates through the writer's API (one committed after its trial boot, one
// rejected), and the power is cut at every sync boundary and at seeded random points: the
// writer is killed with SIGKILL while the file system is frozen, the unsynced state is thrown
// away, and the writer starts again on what a real device would find after the power came
// back.
//
// After every cut the durable state is checked before the writer starts again: no block the
// writer acknowledged as durable is lost, the journal never names a block the slot does not
// hold, the boot state only names slots whose bytes are the verified image (or the factory
// image of the committed slot), acknowledged activations, commits and rejections stay, and
// the update then completes with the right bytes.
//
// GWOTA_FAULTS_N scales the campaign (default 6): N sync boundaries spread over the scenario
// (every boundary once N reaches their number) and N/2 runs, at least 3, with one to three
// random cuts each.
// GWOTA_FAULTS_SEED sets the seed (printed otherwise). With GWOTA_FAULTS_OUT set to a
// directory, a JSON summary is written to powercut.json there.
package powercut
