pub mod config;
pub mod crypto;
pub mod proto;
pub mod spool;
