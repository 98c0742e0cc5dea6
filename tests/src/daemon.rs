//! Real twinfs daemons as child processes.
