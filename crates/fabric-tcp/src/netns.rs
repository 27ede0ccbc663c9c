//! Network namespaces (filled in below).
