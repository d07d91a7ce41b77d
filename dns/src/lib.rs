//! Ferry DNS (work in progress).
