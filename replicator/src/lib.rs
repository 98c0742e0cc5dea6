//! twinfs replication.
