//! The node's identity for mutual TLS between twins: a self-signed certificate
//! kept in the state directory, whose SHA-256 is the node id that peers pin.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use twinfs_replicator::durable::{sync_dir, write_synced};

/// The directory under the state directory that holds the identity.
const IDENTITY_DIR: &str = "identity";
/// Where a new identity is assembled before it is renamed into place.
const STAGING_DIR: &str = "identity.new";
/// The certificate file, PEM.
pub const CERT_FILE: &str = "node.crt.pem";
/// The private key file, PKCS#8 PEM.
pub const KEY_FILE: &str = "node.key.pem";

/// A node's identity as peers see it: the SHA-256 of its certificate (DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// The id of the node presenting the certificate `cert_der`.
    pub fn of_certificate(cert_der: &[u8]) -> NodeId {
        NodeId(Sha256::digest(cert_der).into())
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// 64 lowercase hex digits, without separators.
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Accepts 64 hex digits in either case, with any `:` separators (as
/// `openssl x509 -fingerprint -sha256` prints them) and surrounding
/// whitespace.
impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<NodeId, ParseNodeIdError> {
        let digits: String = s.trim().chars().filter(|&c| c != ':').collect();
        if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(ParseNodeIdError::NotHex(c));
        }
        let mut id = [0; 32];
        // Only the length can be wrong now that every character is a digit.
        hex::decode_to_slice(&digits, &mut id)
            .map_err(|_| ParseNodeIdError::WrongLength(digits.len()))?;
        Ok(NodeId(id))
    }
}

/// Why a string is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseNodeIdError {
    /// A character other than a hex digit, `:` or surrounding whitespace.
    #[error("{0:?} is not a hex digit (expected 64 hex digits, a SHA-256)")]
    NotHex(char),
    /// Not 64 hex digits once the separators are removed.
    #[error("found {0} hex digits (expected 64, a SHA-256)")]
    WrongLength(usize),
}

/// This node's certificate and private key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    node_id: NodeId,
}

impl Identity {
    /// Loads the identity from `<state_dir>/identity/`, or creates one for
    /// `node_name` (the certificate's subject alternative name) if there is
    /// none; the flag says whether it was created. Keeping the files keeps the
    /// node id that peers pin.
    ///
    /// A new identity is written to `<state_dir>/identity.new/` and renamed
    /// into place, so a crash never leaves half an identity. Two processes
    /// must not create the identity of one state directory at the same time.
    pub fn load_or_create(
        state_dir: &Path,
        node_name: &str,
    ) -> Result<(Identity, bool), IdentityError> {
        let dir = state_dir.join(IDENTITY_DIR);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Ok((Identity::load(&cert_path, &key_path)?, false)),
            (false, false) => Ok((Identity::create(state_dir, node_name)?, true)),
            // Making a new identity would change the node id and lock this
            // node out of its peers, so the operator decides.
            (true, false) => Err(IdentityError::Incomplete {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(IdentityError::Incomplete {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    /// The certificate, DER.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key, PKCS#8 DER.
    pub fn private_key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }

    /// The node id: the SHA-256 of [`Identity::certificate`].
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, IdentityError> {
        let cert_pem = fs::read(cert_path).map_err(|source| IdentityError::Read {
            path: cert_path.to_owned(),
            source,
        })?;
        let key_pem = fs::read(key_path).map_err(|source| IdentityError::Read {
            path: key_path.to_owned(),
            source,
        })?;
        let bad = |path: &Path, reason: String| IdentityError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let cert = CertificateDer::from_pem_slice(&cert_pem)
            .map_err(|e| bad(cert_path, format!("no PEM certificate: {e}")))?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad(key_path, format!("no PEM PKCS#8 private key: {e}")))?;
        let key_pair = KeyPair::try_from(&key)
            .map_err(|e| bad(key_path, format!("unusable private key: {e}")))?;
        // The certificate embeds the public key verbatim, which avoids parsing
        // X.509 just to compare the two.
        let public = key_pair.subject_public_key_info();
        if !cert.windows(public.len()).any(|w| w == public) {
            return Err(IdentityError::Mismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        Ok(Identity::new(cert, key))
    }

    fn create(state_dir: &Path, node_name: &str) -> Result<Identity, IdentityError> {
        let generate = |source| IdentityError::Generate {
            node_name: node_name.to_owned(),
            source,
        };
        let key_pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = CertificateParams::new(vec![node_name.to_owned()]).map_err(generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_name);
        let cert = params.self_signed(&key_pair).map_err(generate)?;

        let write = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Write { path, source }
        };
        fs::create_dir_all(state_dir).map_err(write(state_dir))?;
        let staging = state_dir.join(STAGING_DIR);
        // A leftover staging directory is from a creation that crashed before
        // the rename, so it was never anybody's identity.
        match fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(write(&staging)(e)),
            _ => {}
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(write(&staging))?;
        let key_path = staging.join(KEY_FILE);
        write_synced(&key_path, key_pair.serialize_pem().as_bytes(), 0o600)
            .map_err(write(&key_path))?;
        let cert_path = staging.join(CERT_FILE);
        write_synced(&cert_path, cert.pem().as_bytes(), 0o644).map_err(write(&cert_path))?;
        sync_dir(&staging).map_err(write(&staging))?;
        let dir = state_dir.join(IDENTITY_DIR);
        fs::rename(&staging, &dir).map_err(write(&dir))?;
        sync_dir(state_dir).map_err(write(state_dir))?;

        Ok(Identity::new(cert.der().clone(), key_pair.into()))
    }

    fn new(cert: CertificateDer<'static>, key: PrivatePkcs8KeyDer<'static>) -> Identity {
        let node_id = NodeId::of_certificate(&cert);
        Identity { cert, key, node_id }
    }
}

/// Shows the node id only, never the key.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn exists(path: &Path) -> Result<bool, IdentityError> {
    path.try_exists().map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Why the identity cannot be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or directory of the identity cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file or directory of a new identity cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// One of the two files exists without the other.
    #[error(
        "{} exists but {} does not: restore it, or remove the identity \
         directory to create a new identity (peers must then be given the new node id)",
        present.display(),
        missing.display()
    )]
    Incomplete {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// A file is not PEM of the expected kind.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The private key is not the key of the certificate.
    #[error("{} is not the private key of {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rcgen could not make the key or the certificate.
    #[error("cannot generate a certificate for node {node_name:?}: {source}")]
    Generate {
        /// The name that was to go into the certificate.
        node_name: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn creates_then_reloads_the_same_identity() {
        let state = tempfile::tempdir().expect("tempdir");
        let state_dir = state.path().join("state");
        let (first, created) = Identity::load_or_create(&state_dir, "cmm-a").expect("create");
        assert!(created);
        let dir = state_dir.join("identity");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert!(!state_dir.join(STAGING_DIR).exists());

        let (second, created) = Identity::load_or_create(&state_dir, "cmm-a").expect("reload");
        assert!(!created);
        assert_eq!(first.node_id(), second.node_id());
        assert_eq!(first.certificate(), second.certificate());
        assert_eq!(
            first.private_key().secret_pkcs8_der(),
            second.private_key().secret_pkcs8_der()
        );
        let debug = format!("{first:?}");
        assert!(debug.contains(&first.node_id().to_string()), "{debug}");
    }

    #[test]
    fn node_id_is_the_sha256_of_the_certificate() {
        let state = tempfile::tempdir().expect("tempdir");
        let (identity, _) = Identity::load_or_create(state.path(), "cmm-a").expect("create");
        let digest: [u8; 32] = Sha256::digest(identity.certificate().as_ref()).into();
        assert_eq!(identity.node_id().as_bytes(), &digest);
        assert_eq!(identity.node_id().to_string(), hex::encode(digest));
    }

    #[test]
    fn a_crashed_creation_is_discarded() {
        let state = tempfile::tempdir().expect("tempdir");
        let staging = state.path().join(STAGING_DIR);
        fs::create_dir(&staging).expect("mkdir");
        fs::write(staging.join(KEY_FILE), b"half").expect("write");
        let (_, created) = Identity::load_or_create(state.path(), "cmm-a").expect("create");
        assert!(created);
        assert!(!staging.exists());
    }

    #[test]
    fn half_an_identity_is_an_error_naming_the_missing_file() {
        let state = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(state.path(), "cmm-a").expect("create");
        let key = state.path().join("identity").join(KEY_FILE);
        fs::remove_file(&key).expect("remove key");
        let err = Identity::load_or_create(state.path(), "cmm-a").unwrap_err();
        assert!(matches!(err, IdentityError::Incomplete { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&key.display().to_string()),
            "{err}"
        );
        assert!(!key.exists(), "nothing was regenerated");
    }

    #[test]
    fn a_key_from_another_identity_is_refused() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(a.path(), "cmm-a").expect("create a");
        Identity::load_or_create(b.path(), "cmm-b").expect("create b");
        let key = a.path().join("identity").join(KEY_FILE);
        fs::copy(b.path().join("identity").join(KEY_FILE), &key).expect("copy");
        let err = Identity::load_or_create(a.path(), "cmm-a").unwrap_err();
        assert!(matches!(err, IdentityError::Mismatch { .. }), "{err:?}");
    }

    #[test]
    fn a_garbled_certificate_names_the_file() {
        let state = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(state.path(), "cmm-a").expect("create");
        let cert = state.path().join("identity").join(CERT_FILE);
        fs::write(&cert, b"not pem").expect("write");
        let err = Identity::load_or_create(state.path(), "cmm-a").unwrap_err();
        assert!(matches!(err, IdentityError::BadFile { .. }), "{err:?}");
        assert!(err.to_string().contains(CERT_FILE), "{err}");
    }

    #[test]
    fn node_id_parse_and_format_round_trip() {
        let id = NodeId::of_certificate(b"some certificate");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        assert_eq!(text.to_uppercase().parse::<NodeId>(), Ok(id));
        let colons = id
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(format!("  {colons}\n").parse::<NodeId>(), Ok(id));
        assert_eq!(format!("{id:?}"), format!("NodeId({text})"));
    }

    #[test]
    fn bad_node_ids_are_refused() {
        let id = NodeId::of_certificate(b"x").to_string();
        assert_eq!(
            id[..62].parse::<NodeId>(),
            Err(ParseNodeIdError::WrongLength(62))
        );
        assert_eq!(
            format!("{id}00").parse::<NodeId>(),
            Err(ParseNodeIdError::WrongLength(66))
        );
        assert_eq!("".parse::<NodeId>(), Err(ParseNodeIdError::WrongLength(0)));
        assert_eq!(
            format!("{}g", &id[..63]).parse::<NodeId>(),
            Err(ParseNodeIdError::NotHex('g'))
        );
        assert_eq!(
            format!("{} {}", &id[..32], &id[32..]).parse::<NodeId>(),
            Err(ParseNodeIdError::NotHex(' '))
        );
    }
}
