//! twinfs tools library.
