//! Identity: signed session tokens.
//!
//! A token says "this is user U until time T", signed with the node's Ed25519 key (`ring`, the
//! crypto library already under rustls). Nodes verify tokens with the public key alone, so the
//! signing key can live with whatever issues tokens (the app's login service; in dev mode, the
//! node's dev login).
//!
//! Format: `v1.<payload>.<signature>`, both base64url without padding; the payload is the encoded
//! [`Claims`]. The signature covers the literal `v1.<payload>` text.
//!
//! This module never reads a clock: `now` is a parameter.

use nearby_index::codec::{base64url_decode, base64url_encode};
use nearby_index::geo::{Millis, UserId};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "v1.";

/// The longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 512;

/// What a token asserts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user the bearer acts as.
    pub user: UserId,
    /// When the token stops being accepted.
    pub expires_at: Millis,
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token is past its expiry.
    #[error("token expired at {expires_at:?}")]
    Expired {
        /// When it expired.
        expires_at: Millis,
    },
    /// The token is malformed, or its signature does not verify with this node's key.
    #[error("invalid token: {reason}")]
    Invalid {
        /// What is wrong.
        reason: &'static str,
    },
    /// A key could not be generated or parsed.
    #[error("bad signing key: {0}")]
    Key(String),
}

/// Verifies tokens. Holds only the public key.
#[derive(Clone)]
pub struct TokenVerifier {
    public: Vec<u8>,
}

impl TokenVerifier {
    /// A verifier for the raw 32-byte Ed25519 public key.
    pub fn new(public: Vec<u8>) -> Self {
        TokenVerifier { public }
    }

    /// The public key as base64url, as `token.pub` files hold it.
    pub fn public_base64url(&self) -> String {
        base64url_encode(&self.public)
    }

    /// Checks `token` at `now` and returns its claims.
    pub fn verify(&self, token: &str, now: Millis) -> Result<Claims, AuthError> {
        let invalid = |reason| AuthError::Invalid { reason };
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid("too long"));
        }
        let rest = token.strip_prefix(PREFIX).ok_or(invalid("unknown format"))?;
        let (payload, sig) = rest.split_once('.').ok_or(invalid("missing signature"))?;
        let signed = &token[..PREFIX.len() + payload.len()];
        let sig = base64url_decode(sig).ok_or(invalid("signature is not base64url"))?;
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| invalid("bad signature"))?;
        let bytes = base64url_decode(payload).ok_or(invalid("payload is not base64url"))?;
        let claims: Claims =
            nearby_index::codec::decode(&bytes).map_err(|_| invalid("payload does not decode"))?;
        if claims.expires_at <= now {
            return Err(AuthError::Expired {
                expires_at: claims.expires_at,
            });
        }
        Ok(claims)
    }
}

/// Issues tokens (and verifies them).
pub struct TokenSigner {
    key: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl TokenSigner {
    /// A new random key.
    pub fn generate() -> Result<Self, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| AuthError::Key(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// A key from its PKCS#8 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AuthError> {
        let key = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| AuthError::Key(e.to_string()))?;
        Ok(TokenSigner {
            key,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The PKCS#8 document, to store the key.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The verifier for this key.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier::new(self.key.public_key().as_ref().to_vec())
    }

    /// A token for `claims`.
    pub fn sign(&self, claims: Claims) -> String {
        // Encoding two integers cannot fail.
        let payload = base64url_encode(&nearby_index::codec::encode(&claims).unwrap_or_default());
        let signed = format!("{PREFIX}{payload}");
        let sig = self.key.sign(signed.as_bytes());
        format!("{signed}.{}", base64url_encode(sig.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_expire_and_resist_forgery() {
        let signer = TokenSigner::generate().expect("key");
        let v = signer.verifier();
        let claims = Claims {
            user: 42,
            expires_at: Millis(10_000),
        };
        let token = signer.sign(claims);
        assert_eq!(v.verify(&token, Millis(9_999)), Ok(claims));
        assert!(matches!(
            v.verify(&token, Millis(10_000)),
            Err(AuthError::Expired { .. })
        ));

        // Another key's token, a changed payload, garbage: all invalid.
        let other = TokenSigner::generate().expect("key").sign(claims);
        assert!(matches!(
            v.verify(&other, Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
        let forged_payload = base64url_encode(
            &nearby_index::codec::encode(&Claims {
                user: 7,
                expires_at: Millis(10_000),
            })
            .expect("encode"),
        );
        let sig = token.rsplit('.').next().expect("sig");
        let forged = format!("v1.{forged_payload}.{sig}");
        assert!(matches!(
            v.verify(&forged, Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
        for junk in ["", "v1.", "v1.abc", "v2.a.b", &"x".repeat(1000)] {
            assert!(
                matches!(v.verify(junk, Millis(0)), Err(AuthError::Invalid { .. })),
                "{junk}"
            );
        }
        // The key round-trips through its PKCS#8 form.
        let again = TokenSigner::from_pkcs8(signer.pkcs8()).expect("reload");
        assert_eq!(again.verifier().verify(&token, Millis(0)), Ok(claims));
    }
}
