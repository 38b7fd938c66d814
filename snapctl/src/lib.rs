//! The snapshot engine. See the README.
