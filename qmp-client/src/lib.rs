//! QMP client
