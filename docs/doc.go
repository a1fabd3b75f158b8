// Package docs holds the project's documentation (the Markdown files beside this one) and
// the tests that keep it honest: the reason table of REASONS.md matches the code, every
// Markdown file the repository cites exists, and every test a document names exists.
package docs
