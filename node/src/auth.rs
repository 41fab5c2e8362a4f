//! Identity: signed session tokens.
//!
//! A token says "this is user U until time T", signed with an Ed25519 key. Nodes verify tokens
//! with public keys alone, so the signing key lives with whatever issues tokens (the app's login
//! service; in dev mode, the node's dev login).
//!
//! # Format: PASETO v4.public
//!
//! Tokens are [PASETO](https://github.com/paseto-standard/paseto-spec) `v4.public` tokens, so a
//! login service issues them with any PASETO library, and nodes verify them with a maintained
//! implementation (`pasetors`):
//!
//! ```text
//! v4.public.<base64url(payload || signature)>.<base64url(footer)>
//! payload: {"sub":"42","exp":"2026-12-02T10:00:00Z"}    the user id (a decimal string), RFC 3339
//! footer:  {"kid":"k4.pid.…"}                          the PASERK id of the signing key
//! ```
//!
//! # Key rotation
//!
//! A node accepts every key it is given (`auth.token_public_key` lists one per line). The
//! footer's `kid` picks the key; a token without a footer is tried against each. To rotate: add
//! the new public key to every node, switch the issuer to the new key, and remove the old key
//! once the last token it signed has expired.
//!
//! # Migration from the tokens before
//!
//! Tokens of the earlier home-made format (`v1.<payload>.<signature>`, the same Ed25519 keys)
//! are still accepted until they expire, so issued sessions survive the upgrade; nodes issue
//! only `v4.public` tokens (`docs/operations.md` has the rotation and upgrade steps).
//!
//! This module never reads a clock: `now` is a parameter.

use nearby_index::codec::{base64url_decode, base64url_encode};
use nearby_index::geo::{Millis, UserId};
use pasetors::keys::{AsymmetricPublicKey, AsymmetricSecretKey};
use pasetors::paserk::{FormatAsPaserk, Id};
use pasetors::token::UntrustedToken;
use pasetors::version4::{PublicToken, V4};
use pasetors::Public;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

const V4_PREFIX: &str = "v4.public.";
const V1_PREFIX: &str = "v1.";

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

/// The PASETO payload: registered claims `sub` and `exp`.
#[derive(Serialize, Deserialize)]
struct Payload {
    sub: String,
    exp: String,
}

/// The PASETO footer: the signing key's PASERK id.
#[derive(Serialize, Deserialize)]
struct Footer {
    kid: String,
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
    /// The token is malformed, or its signature does not verify with this node's keys.
    #[error("invalid token: {reason}")]
    Invalid {
        /// What is wrong.
        reason: &'static str,
    },
    /// A key could not be generated or parsed.
    #[error("bad signing key: {0}")]
    Key(String),
}

fn invalid(reason: &'static str) -> AuthError {
    AuthError::Invalid { reason }
}

/// One public key a verifier accepts.
#[derive(Clone)]
struct Key {
    raw: Vec<u8>,
    kid: String,
    paseto: AsymmetricPublicKey<V4>,
}

impl Key {
    fn new(raw: Vec<u8>) -> Result<Key, AuthError> {
        let paseto = AsymmetricPublicKey::<V4>::from(&raw)
            .map_err(|_| AuthError::Key("an Ed25519 public key has 32 bytes".into()))?;
        Ok(Key {
            kid: key_id(&paseto),
            raw,
            paseto,
        })
    }
}

/// The PASERK id (`k4.pid.…`) of a public key.
fn key_id(key: &AsymmetricPublicKey<V4>) -> String {
    let mut id = String::new();
    // Writing into a String cannot fail.
    let _ = Id::from(key).fmt(&mut id);
    id
}

/// Verifies tokens. Holds only public keys.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: Vec<Key>,
}

impl TokenVerifier {
    /// A verifier for one raw 32-byte Ed25519 public key.
    ///
    /// # Panics
    /// If `public` is not 32 bytes long; [`TokenVerifier::with_keys`] reports that as an error.
    pub fn new(public: Vec<u8>) -> Self {
        match Self::with_keys(vec![public]) {
            Ok(v) => v,
            Err(e) => panic!("TokenVerifier::new: {e}"),
        }
    }

    /// A verifier accepting tokens of any of `keys` (raw 32-byte Ed25519 public keys): two
    /// during a key rotation.
    pub fn with_keys(keys: Vec<Vec<u8>>) -> Result<Self, AuthError> {
        if keys.is_empty() {
            return Err(AuthError::Key("no public key".into()));
        }
        Ok(TokenVerifier {
            keys: keys.into_iter().map(Key::new).collect::<Result<_, _>>()?,
        })
    }

    /// The first public key as base64url, as `token.pub` files hold it.
    pub fn public_base64url(&self) -> String {
        self.keys
            .first()
            .map(|k| base64url_encode(&k.raw))
            .unwrap_or_default()
    }

    /// The PASERK ids of the accepted keys.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// Checks `token` at `now` and returns its claims.
    pub fn verify(&self, token: &str, now: Millis) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid("too long"));
        }
        let claims = if token.starts_with(V4_PREFIX) {
            self.verify_v4(token)?
        } else if token.starts_with(V1_PREFIX) {
            self.verify_v1(token)?
        } else {
            return Err(invalid("unknown format"));
        };
        if claims.expires_at <= now {
            return Err(AuthError::Expired {
                expires_at: claims.expires_at,
            });
        }
        Ok(claims)
    }

    fn verify_v4(&self, token: &str) -> Result<Claims, AuthError> {
        let untrusted = UntrustedToken::<Public, V4>::try_from(token)
            .map_err(|_| invalid("malformed v4.public token"))?;
        let footer = untrusted.untrusted_footer();
        let candidates: Vec<&Key> = if footer.is_empty() {
            self.keys.iter().collect()
        } else {
            let footer: Footer =
                serde_json::from_slice(footer).map_err(|_| invalid("footer is not {\"kid\": …}"))?;
            let key = self.keys.iter().find(|k| k.kid == footer.kid);
            vec![key.ok_or(invalid("signed by a key this node does not accept"))?]
        };
        let trusted = candidates
            .into_iter()
            .find_map(|k| PublicToken::verify(&k.paseto, &untrusted, None, None).ok())
            .ok_or(invalid("bad signature"))?;
        let payload: Payload =
            serde_json::from_str(trusted.payload()).map_err(|_| invalid("payload lacks sub or exp"))?;
        let user: UserId = payload.sub.parse().map_err(|_| invalid("sub is not a user id"))?;
        let exp = time::OffsetDateTime::parse(&payload.exp, &time::format_description::well_known::Rfc3339)
            .map_err(|_| invalid("exp is not an RFC 3339 time"))?;
        let ms = exp.unix_timestamp_nanos() / 1_000_000;
        let expires_at = Millis(u64::try_from(ms).map_err(|_| invalid("exp is before 1970"))?);
        Ok(Claims { user, expires_at })
    }

    /// The format before PASETO (see the module doc), accepted until its tokens expire.
    fn verify_v1(&self, token: &str) -> Result<Claims, AuthError> {
        let rest = &token[V1_PREFIX.len()..];
        let (payload, sig) = rest.split_once('.').ok_or(invalid("missing signature"))?;
        let signed = &token[..V1_PREFIX.len() + payload.len()];
        let sig = base64url_decode(sig).ok_or(invalid("signature is not base64url"))?;
        self.keys
            .iter()
            .find(|k| {
                UnparsedPublicKey::new(&ED25519, &k.raw)
                    .verify(signed.as_bytes(), &sig)
                    .is_ok()
            })
            .ok_or(invalid("bad signature"))?;
        let bytes = base64url_decode(payload).ok_or(invalid("payload is not base64url"))?;
        nearby_index::codec::decode(&bytes).map_err(|_| invalid("payload does not decode"))
    }
}

/// Issues tokens (and verifies them).
pub struct TokenSigner {
    key: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    paseto: AsymmetricSecretKey<V4>,
    footer: Vec<u8>,
}

/// The prefix of the private key inside an Ed25519 PKCS#8 document (RFC 8410): an OCTET STRING
/// of 34 bytes holding an OCTET STRING of the 32-byte seed.
const SEED_PREFIX: [u8; 4] = [0x04, 0x22, 0x04, 0x20];

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
        let public = key.public_key().as_ref().to_vec();
        let seed = pkcs8
            .windows(SEED_PREFIX.len())
            .position(|w| w == SEED_PREFIX)
            .and_then(|at| pkcs8.get(at + SEED_PREFIX.len()..at + SEED_PREFIX.len() + 32))
            .ok_or_else(|| AuthError::Key("no Ed25519 seed in the PKCS#8 document".into()))?;
        let mut secret = seed.to_vec();
        secret.extend_from_slice(&public);
        let paseto = AsymmetricSecretKey::<V4>::from(&secret).map_err(|e| AuthError::Key(e.to_string()))?;
        let public_key =
            AsymmetricPublicKey::<V4>::try_from(&paseto).map_err(|e| AuthError::Key(e.to_string()))?;
        if public_key.as_bytes() != public.as_slice() {
            return Err(AuthError::Key(
                "the PKCS#8 seed does not match its public key".into(),
            ));
        }
        let footer = serde_json::to_vec(&Footer {
            kid: key_id(&public_key),
        })
        .map_err(|e| AuthError::Key(e.to_string()))?;
        Ok(TokenSigner {
            key,
            pkcs8: pkcs8.to_vec(),
            paseto,
            footer,
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

    /// A `v4.public` token for `claims`, its footer naming this key.
    pub fn sign(&self, claims: Claims) -> String {
        let exp =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(claims.expires_at.0) * 1_000_000)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                // Past year 9999: the latest time RFC 3339 can say.
                .unwrap_or_else(|| "9999-12-31T23:59:59Z".to_string());
        let payload = Payload {
            sub: claims.user.to_string(),
            exp,
        };
        // A struct of two strings always serializes, and signing with a valid key cannot fail.
        let message = serde_json::to_vec(&payload).unwrap_or_default();
        PublicToken::sign(&self.paseto, &message, Some(&self.footer), None).unwrap_or_default()
    }

    /// A token in the format before PASETO, for the migration's tests.
    #[doc(hidden)]
    pub fn sign_v1(&self, claims: Claims) -> String {
        let payload = base64url_encode(&nearby_index::codec::encode(&claims).unwrap_or_default());
        let signed = format!("{V1_PREFIX}{payload}");
        let sig = self.key.sign(signed.as_bytes());
        format!("{signed}.{}", base64url_encode(sig.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLAIMS: Claims = Claims {
        user: 42,
        expires_at: Millis(1_800_000_000_000),
    };

    #[test]
    fn tokens_are_paseto_v4_public_and_verify_expire_and_resist_forgery() {
        let signer = TokenSigner::generate().expect("key");
        let v = signer.verifier();
        let token = signer.sign(CLAIMS);
        assert!(token.starts_with("v4.public."), "{token}");
        assert!(token.len() < MAX_TOKEN_LEN, "{} bytes", token.len());
        assert_eq!(v.verify(&token, Millis(CLAIMS.expires_at.0 - 1)), Ok(CLAIMS));
        assert!(matches!(
            v.verify(&token, CLAIMS.expires_at),
            Err(AuthError::Expired { .. })
        ));

        // Another key's token (its footer names a key this node does not accept), the same
        // token with its footer cut, with a changed payload, garbage: all invalid.
        let other = TokenSigner::generate().expect("key").sign(CLAIMS);
        assert!(matches!(
            v.verify(&other, Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
        let no_footer = other.rsplit_once('.').expect("footer").0;
        assert!(matches!(
            v.verify(no_footer, Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
        let body = token.strip_prefix(V4_PREFIX).expect("prefix");
        let (signed, footer) = body.split_once('.').expect("footer");
        let mut bytes = base64url_decode(signed).expect("b64");
        bytes[8] ^= 1; // inside the payload's JSON
        let forged = format!("{V4_PREFIX}{}.{footer}", base64url_encode(&bytes));
        assert!(matches!(
            v.verify(&forged, Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
        for junk in [
            "",
            "v4.public.",
            "v4.public.abc",
            "v4.local.abc",
            "v2.a.b",
            &"x".repeat(1000),
        ] {
            assert!(
                matches!(v.verify(junk, Millis(0)), Err(AuthError::Invalid { .. })),
                "{junk}"
            );
        }
        // The key round-trips through its PKCS#8 form.
        let again = TokenSigner::from_pkcs8(signer.pkcs8()).expect("reload");
        assert_eq!(again.verifier().verify(&token, Millis(0)), Ok(CLAIMS));
        assert_eq!(again.sign(CLAIMS), token, "Ed25519 signatures are deterministic");
    }

    #[test]
    fn an_off_the_shelf_paseto_library_issues_tokens_nodes_accept() {
        // What an app's login service does with pasetors' own claims (iat, nbf, exp, sub), no
        // footer: the node tries its keys.
        let signer = TokenSigner::generate().expect("key");
        let mut claims = pasetors::claims::Claims::new().expect("claims");
        claims.subject("42").expect("sub");
        claims.expiration("2027-01-15T08:00:00+01:00").expect("exp");
        let token = pasetors::public::sign(&signer.paseto, &claims, None, None).expect("sign");
        let got = signer.verifier().verify(&token, Millis(0)).expect("accepted");
        assert_eq!(got.user, 42);
        assert_eq!(got.expires_at, Millis(1_799_996_400_000), "07:00 UTC");
    }

    #[test]
    fn two_keys_are_accepted_during_a_rotation_and_each_token_names_its_key() {
        let (old, new) = (
            TokenSigner::generate().expect("old"),
            TokenSigner::generate().expect("new"),
        );
        let raw = |s: &TokenSigner| base64url_decode(&s.verifier().public_base64url()).expect("key");
        let both = TokenVerifier::with_keys(vec![raw(&old), raw(&new)]).expect("keys");
        assert_eq!(both.verify(&old.sign(CLAIMS), Millis(0)), Ok(CLAIMS));
        assert_eq!(both.verify(&new.sign(CLAIMS), Millis(0)), Ok(CLAIMS));
        assert_eq!(
            both.key_ids(),
            vec![
                old.verifier().key_ids()[0].clone(),
                new.verifier().key_ids()[0].clone()
            ]
        );
        assert!(both.key_ids()[0].starts_with("k4.pid."), "{:?}", both.key_ids());
        // Once the old key is removed, its tokens are refused.
        let after = TokenVerifier::with_keys(vec![raw(&new)]).expect("key");
        assert!(matches!(
            after.verify(&old.sign(CLAIMS), Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
        assert!(
            TokenVerifier::with_keys(vec![vec![1; 31]]).is_err(),
            "a key of 31 bytes"
        );
        assert!(TokenVerifier::with_keys(Vec::new()).is_err(), "no key");
    }

    #[test]
    fn tokens_of_the_format_before_are_accepted_until_they_expire() {
        let signer = TokenSigner::generate().expect("key");
        let v = signer.verifier();
        let token = signer.sign_v1(CLAIMS);
        assert!(token.starts_with("v1."));
        assert_eq!(v.verify(&token, Millis(0)), Ok(CLAIMS));
        assert!(matches!(
            v.verify(&token, CLAIMS.expires_at),
            Err(AuthError::Expired { .. })
        ));
        let forged_payload =
            base64url_encode(&nearby_index::codec::encode(&Claims { user: 7, ..CLAIMS }).expect("encode"));
        let sig = token.rsplit('.').next().expect("sig");
        let forged = format!("v1.{forged_payload}.{sig}");
        assert!(matches!(
            v.verify(&forged, Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
        let other = TokenSigner::generate().expect("key").sign_v1(CLAIMS);
        assert!(matches!(
            v.verify(&other, Millis(0)),
            Err(AuthError::Invalid { .. })
        ));
    }
}
