//! JSON Web Tokens issued by someone else (an identity provider, a CI system), verified
//! with `jsonwebtoken`: HS256 with a shared secret, RS256 with a PEM public key.
//!
//! The key is chosen by the token's `alg`, and each key is used with its one algorithm
//! only, so a token cannot pick the algorithm its key is checked with (the RS256 public
//! key is never tried as an HMAC secret). `exp` is required; `iss` and `aud` are required
//! and checked when configured. Scopes come from `scope` (OAuth's space-separated string,
//! or a list) and `scopes` (a list, or such a string); names that are not Tasker scopes
//! are ignored.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use super::scope::Scopes;
use super::{Principal, Rejection};

/// Verifies JWTs with the configured keys.
pub(crate) struct JwtVerifier {
    hs256: Option<(DecodingKey, Validation)>,
    rs256: Option<(DecodingKey, Validation)>,
}

/// Where tokens come from and for whom, checked when given.
pub(crate) struct Expectations<'a> {
    pub(crate) issuer: Option<&'a str>,
    pub(crate) audience: &'a [String],
    pub(crate) leeway_seconds: u64,
}

impl JwtVerifier {
    /// A verifier for the keys given; `None` when neither is.
    pub(crate) fn new(
        hs256_secret: Option<&[u8]>,
        rs256_public_key_pem: Option<&[u8]>,
        expect: &Expectations<'_>,
    ) -> anyhow::Result<Option<Self>> {
        let hs256 = hs256_secret.map(|secret| {
            (
                DecodingKey::from_secret(secret),
                validation(Algorithm::HS256, expect),
            )
        });
        let rs256 = rs256_public_key_pem
            .map(|pem| {
                DecodingKey::from_rsa_pem(pem)
                    .map(|key| (key, validation(Algorithm::RS256, expect)))
                    .map_err(|error| {
                        anyhow::anyhow!(
                            "TASKER_JWT_RS256_PUBLIC_KEY is not an RSA public key in PEM: {error}"
                        )
                    })
            })
            .transpose()?;
        if hs256.is_none() && rs256.is_none() {
            return Ok(None);
        }
        Ok(Some(JwtVerifier { hs256, rs256 }))
    }

    /// The algorithms accepted, for the start-up log.
    pub(crate) fn algorithms(&self) -> Vec<&'static str> {
        [
            ("HS256", self.hs256.is_some()),
            ("RS256", self.rs256.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }

    /// Verify a token's signature and claims; answer who it is and what it may do.
    pub(crate) fn verify(&self, token: &str) -> Result<Principal, Rejection> {
        let header = decode_header(token).map_err(|_| Rejection::new("malformed JWT"))?;
        let (key, validation) = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| {
            Rejection::new(format!(
                "JWT algorithm {:?} is not accepted here (accepted: {})",
                header.alg,
                self.algorithms().join(", ")
            ))
        })?;
        let claims = decode::<Claims>(token, key, validation)
            .map_err(|error| Rejection::new(describe(error.kind())))?
            .claims;
        let scopes = Scopes::parse_lenient(
            claims
                .scope
                .iter()
                .chain(claims.scopes.iter())
                .flat_map(Names::as_strs),
        );
        Ok(Principal {
            subject: format!("jwt:{}", claims.sub.as_deref().unwrap_or("(no sub)")),
            scopes,
        })
    }
}

fn validation(algorithm: Algorithm, expect: &Expectations<'_>) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = expect.leeway_seconds;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = expect.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    if expect.audience.is_empty() {
        // Without an expected audience, a token's `aud` (which an identity provider
        // always sets) is not checked rather than refused.
        validation.validate_aud = false;
    } else {
        validation.set_audience(expect.audience);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Why a token was refused, for the caller (no key material, no claim values).
fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => "the JWT expired".into(),
        ErrorKind::ImmatureSignature => "the JWT is not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "the JWT's signature does not verify".into(),
        ErrorKind::InvalidIssuer => "the JWT's issuer (iss) is not the expected one".into(),
        ErrorKind::InvalidAudience => "the JWT's audience (aud) is not the expected one".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the JWT has no `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the JWT's `{claim}` claim is malformed"),
        ErrorKind::InvalidAlgorithm => "the JWT's algorithm does not match its key".into(),
        _ => "malformed JWT".into(),
    }
}

/// The claims Tasker reads (the registered ones are checked by `Validation`).
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    scope: Option<Names>,
    #[serde(default)]
    scopes: Option<Names>,
}

/// A claim holding scope names: a space-separated string or a list of names.
#[derive(Deserialize)]
#[serde(untagged)]
enum Names {
    Joined(String),
    List(Vec<String>),
}

impl Names {
    fn as_strs(&self) -> Vec<&str> {
        match self {
            Names::Joined(names) => vec![names.as_str()],
            Names::List(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::{Value, json};

    use super::*;
    use crate::auth::scope::Scope;

    const SECRET: &[u8] = b"a test secret that is long enough";

    fn verifier(issuer: Option<&str>, audience: &[String]) -> JwtVerifier {
        JwtVerifier::new(
            Some(SECRET),
            None,
            &Expectations {
                issuer,
                audience,
                leeway_seconds: 0,
            },
        )
        .unwrap()
        .unwrap()
    }

    fn mint(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn in_an_hour() -> i64 {
        chrono::Utc::now().timestamp() + 3600
    }

    #[test]
    fn scopes_come_from_the_scope_string_and_the_scopes_list() {
        let principal = verifier(None, &[])
            .verify(&mint(json!({
                "sub": "ci", "exp": in_an_hour(), "aud": "somewhere",
                "scope": "openid tasks:read", "scopes": ["tasks:write", "email"],
            })))
            .unwrap();
        assert_eq!(principal.subject, "jwt:ci");
        assert_eq!(principal.scopes.names(), ["tasks:read", "tasks:write"]);
        let principal = verifier(None, &[])
            .verify(&mint(json!({"exp": in_an_hour(), "scope": ["admin"]})))
            .unwrap();
        assert!(principal.scopes.allows(Scope::TasksOperate));
        let principal = verifier(None, &[])
            .verify(&mint(json!({"exp": in_an_hour()})))
            .unwrap();
        assert!(principal.scopes.is_empty());
    }

    #[test]
    fn expiry_issuer_and_audience_are_enforced() {
        let refused = |verifier: &JwtVerifier, claims: Value| {
            verifier.verify(&mint(claims)).unwrap_err().reason
        };
        let plain = verifier(None, &[]);
        assert_eq!(
            refused(&plain, json!({"exp": chrono::Utc::now().timestamp() - 10})),
            "the JWT expired"
        );
        assert_eq!(
            refused(&plain, json!({"sub": "x"})),
            "the JWT has no `exp` claim"
        );
        let strict = verifier(Some("https://idp"), &["tasker".to_owned()]);
        assert!(
            strict
                .verify(&mint(
                    json!({"exp": in_an_hour(), "iss": "https://idp", "aud": "tasker"})
                ))
                .is_ok()
        );
        assert_eq!(
            refused(
                &strict,
                json!({"exp": in_an_hour(), "iss": "https://evil", "aud": "tasker"})
            ),
            "the JWT's issuer (iss) is not the expected one"
        );
        assert_eq!(
            refused(
                &strict,
                json!({"exp": in_an_hour(), "iss": "https://idp", "aud": "other"})
            ),
            "the JWT's audience (aud) is not the expected one"
        );
        assert_eq!(
            refused(&strict, json!({"exp": in_an_hour(), "iss": "https://idp"})),
            "the JWT has no `aud` claim"
        );
    }

    #[test]
    fn wrong_keys_and_algorithms_are_refused() {
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"exp": in_an_hour()}),
            &EncodingKey::from_secret(b"another secret"),
        )
        .unwrap();
        assert_eq!(
            verifier(None, &[]).verify(&other).unwrap_err().reason,
            "the JWT's signature does not verify"
        );
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"exp": in_an_hour()}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(
            verifier(None, &[])
                .verify(&hs384)
                .unwrap_err()
                .reason
                .contains("not accepted")
        );
        assert_eq!(
            verifier(None, &[]).verify("not.a.jwt").unwrap_err().reason,
            "malformed JWT"
        );
    }
}
