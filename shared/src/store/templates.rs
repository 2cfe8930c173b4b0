//! Registering and reading templates.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::template::TemplateDefinition;

/// A stored template.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TemplateRecord {
    /// The validated definition.
    #[serde(flatten)]
    pub definition: TemplateDefinition,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// The database id (used by tasks).
    #[serde(skip)]
    pub template_id: i64,
}

/// One line of the template list.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TemplateSummary {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Description.
    pub description: Option<String>,
    /// Number of steps.
    pub step_count: i32,
}

/// What registering a template did.
#[derive(Debug)]
pub enum Registered {
    /// It is new.
    Created {
        /// The stored template.
        template: TemplateRecord,
        /// Whether its namespace is new too (queues must be declared and announced).
        new_namespace: bool,
    },
    /// The identical template was already there.
    Identical(TemplateRecord),
    /// `namespace/name/version` exists with another definition.
    Conflict(TemplateRecord),
}

/// Store a validated template, or report that it is already there.
pub async fn register(pool: &PgPool, definition: &TemplateDefinition) -> sqlx::Result<Registered> {
    let body = serde_json::to_value(definition).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    // Twice at most: a registration that created the namespace at the same moment, and
    // committed while this statement waited for it, leaves this one's snapshot without
    // the namespace, so nothing was written; the next statement sees it.
    for _ in 0..2 {
        let row = sqlx::query(include_str!("../../sql/templates/register.sql"))
            .bind(&definition.namespace)
            .bind(&definition.name)
            .bind(&definition.version)
            .bind(&definition.description)
            .bind(&body)
            .fetch_optional(pool)
            .await?;
        if let Some(row) = row {
            return Ok(Registered::Created {
                template: TemplateRecord {
                    definition: definition.clone(),
                    created_at: row.try_get("created_at")?,
                    template_id: row.try_get("template_id")?,
                },
                new_namespace: row
                    .try_get::<Option<bool>, _>("new_namespace")?
                    .unwrap_or(false),
            });
        }
        let existing = find(
            pool,
            &definition.namespace,
            &definition.name,
            Some(&definition.version),
        )
        .await?;
        if let Some(existing) = existing {
            return Ok(if existing.definition == *definition {
                Registered::Identical(existing)
            } else {
                Registered::Conflict(existing)
            });
        }
    }
    Err(sqlx::Error::RowNotFound)
}

/// A template by namespace and name: the given version, or else the highest by semver
/// (`tasker_find_template`, planned once per connection).
pub async fn find<'e>(
    db: impl sqlx::PgExecutor<'e>,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> sqlx::Result<Option<TemplateRecord>> {
    Ok(find_newest(db, namespace, name, version)
        .await?
        .map(|(template, _)| template))
}

/// [`find`], and how many versions it chose from.
async fn find_newest<'e>(
    db: impl sqlx::PgExecutor<'e>,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> sqlx::Result<Option<(TemplateRecord, usize)>> {
    let rows = sqlx::query(include_str!("../../sql/templates/find.sql"))
        .bind(namespace)
        .bind(name)
        .bind(version)
        .fetch_all(db)
        .await?;
    let versions = rows.len();
    let newest = rows
        .into_iter()
        .max_by_key(|row| semver::Version::parse(row.get::<&str, _>("version")).ok());
    newest
        .map(|row| Ok((record_from_row(&row)?, versions)))
        .transpose()
}

/// A template as a task creation resolved it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The template.
    pub template: Arc<TemplateRecord>,
    /// When the creation named no version: how many versions the name had when the
    /// newest was picked. The creating statement checks that it still has as many
    /// ([`tasks::create`](crate::store::tasks::create)).
    pub versions_known: Option<i32>,
}

type Versions = HashMap<(String, String, String), Arc<TemplateRecord>>;

/// The templates task creations named, kept in memory so that a creation costs one
/// statement rather than a lookup and then the insert.
///
/// A version, once registered, never changes and is never deleted, so a template found
/// by its version stays right for ever. Which version is the newest can change: another
/// coordinator may register one. A creation that named no version therefore carries
/// the number of versions the name had ([`Resolved::versions_known`]), and the creating
/// statement refuses it (`TK001`) when that number changed; the caller then
/// [reloads](Self::reload) the name and creates again.
#[derive(Debug, Default)]
pub struct TemplateCache {
    versions: RwLock<Versions>,
    newest: RwLock<HashMap<(String, String), Resolved>>,
}

impl TemplateCache {
    /// The template a creation names: the given version, or else the newest (from
    /// memory when this coordinator has resolved the name before).
    pub async fn resolve(
        &self,
        pool: &PgPool,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> sqlx::Result<Option<Resolved>> {
        let cached = match version {
            Some(version) => read(&self.versions)
                .get(&(namespace.to_owned(), name.to_owned(), version.to_owned()))
                .map(|template| Resolved {
                    template: template.clone(),
                    versions_known: None,
                }),
            None => read(&self.newest)
                .get(&(namespace.to_owned(), name.to_owned()))
                .cloned(),
        };
        if cached.is_some() {
            return Ok(cached);
        }
        self.reload(pool, namespace, name, version).await
    }

    /// [`resolve`](Self::resolve), from the database whatever this cache holds (and
    /// kept for the next one).
    pub async fn reload(
        &self,
        pool: &PgPool,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> sqlx::Result<Option<Resolved>> {
        let Some((template, versions)) = find_newest(pool, namespace, name, version).await? else {
            return Ok(None);
        };
        let template = Arc::new(template);
        write(&self.versions).insert(
            (
                namespace.to_owned(),
                name.to_owned(),
                template.definition.version.clone(),
            ),
            template.clone(),
        );
        if version.is_some() {
            return Ok(Some(Resolved {
                template,
                versions_known: None,
            }));
        }
        let resolved = Resolved {
            template,
            versions_known: Some(i32::try_from(versions).unwrap_or(i32::MAX)),
        };
        write(&self.newest).insert((namespace.to_owned(), name.to_owned()), resolved.clone());
        Ok(Some(resolved))
    }

    /// Forget which version of `namespace/name` is the newest (a version was registered).
    pub fn forget_newest(&self, namespace: &str, name: &str) {
        write(&self.newest).remove(&(namespace.to_owned(), name.to_owned()));
    }
}

// A panic while a lock was held cannot leave these maps half-changed (each change is
// one insert or remove), so a poisoned lock's contents are still good.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Which templates a page lists ([`page`]).
#[derive(Debug, Clone, Default)]
pub struct TemplateFilter {
    /// Only this namespace's.
    pub namespace: Option<String>,
    /// Only templates of this name.
    pub name: Option<String>,
    /// After this template (`namespace/name`, as [`page`] gives it).
    pub cursor: Option<String>,
}

/// The first `limit` templates `filter` matches, ordered by namespace and name (in byte
/// order), each with every version ordered by semver; with the cursor of the next page
/// (`namespace/name` of this page's last template) when more follow. A namespace holds
/// no `/` (a template name may): a cursor's first `/` ends its namespace.
pub async fn page(
    db: impl sqlx::PgExecutor<'_>,
    filter: &TemplateFilter,
    limit: i64,
) -> sqlx::Result<(Vec<TemplateSummary>, Option<String>)> {
    let after = filter
        .cursor
        .as_deref()
        .map(|cursor| cursor.split_once('/').unwrap_or((cursor, "")));
    let mut summaries =
        sqlx::query_as::<_, TemplateSummary>(include_str!("../../sql/templates/page.sql"))
            .bind(after.map(|(namespace, _)| namespace))
            .bind(after.map(|(_, name)| name))
            .bind(limit + 1)
            .bind(filter.namespace.as_deref())
            .bind(filter.name.as_deref())
            .fetch_all(db)
            .await?;
    sort_by_version(&mut summaries);
    // One template more than the page holds was read, to know whether more follow: the
    // page ends where that one's versions begin.
    let mut templates = 0;
    let more = (0..summaries.len()).find(|&i| {
        let (this, before) = (&summaries[i], i.checked_sub(1).map(|i| &summaries[i]));
        if before.is_none_or(|b| (&b.namespace, &b.name) != (&this.namespace, &this.name)) {
            templates += 1;
        }
        templates > limit
    });
    let next = more.map(|i| {
        let last = &summaries[i - 1];
        let cursor = format!("{}/{}", last.namespace, last.name);
        summaries.truncate(i);
        cursor
    });
    Ok((summaries, next))
}

/// Order by namespace, name (byte order) and version (semver).
fn sort_by_version(summaries: &mut [TemplateSummary]) {
    summaries.sort_by(|a, b| {
        (
            &a.namespace,
            &a.name,
            semver::Version::parse(&a.version).ok(),
        )
            .cmp(&(
                &b.namespace,
                &b.name,
                semver::Version::parse(&b.version).ok(),
            ))
    });
}

/// The names of every namespace that has a template.
pub async fn namespaces(db: impl sqlx::PgExecutor<'_>) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT name FROM namespaces ORDER BY name")
        .fetch_all(db)
        .await
}

fn record_from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<TemplateRecord> {
    let definition: serde_json::Value = row.try_get("definition")?;
    Ok(TemplateRecord {
        definition: serde_json::from_value(definition)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        created_at: row.try_get("created_at")?,
        template_id: row.try_get("template_id")?,
    })
}
