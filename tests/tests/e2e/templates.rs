//! Listing the registered templates.

use serde_json::{Value, json};
use tasker_tests::TestEnv;

/// The `namespace/name version` of each template version a page lists, in its order.
fn listed(page: &Value) -> Vec<String> {
    page["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("{}/{} {}", t["namespace"], t["name"], t["version"]).replace('"', ""))
        .collect()
}

/// `GET /v1/templates` lists templates a page at a time, by namespace and name in byte
/// order, each with every version in semver order: `limit` counts templates, and a page
/// never splits one's versions. It filters by namespace and name, and names every bad
/// parameter.
#[tokio::test]
async fn templates_are_listed_in_pages_each_with_every_version() {
    let env = TestEnv::start("template-pages").await.unwrap();
    // Registered out of order; upper case and `-` sort apart in byte order and a locale's.
    for (namespace, name, version) in [
        ("pages-b", "x", "1.10.0"),
        ("pages-b", "x", "1.9.0"),
        ("pages-a", "Zed", "1.0.0"),
        ("pages-a", "ab", "1.0.0"),
        ("pages-a", "a-b", "1.0.0"),
        ("pages-a", "ab/c", "1.0.0"),
        ("pages-b", "x", "1.2.0"),
        ("pages-c", "y", "0.1.0"),
    ] {
        let (status, body) = env
            .register_template(&format!(
                "namespace: {namespace}\nname: {name}\nversion: {version}\nsteps:\n  - {{name: only, handler: tasker.noop}}\n"
            ))
            .await
            .unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let every = [
        "pages-a/Zed 1.0.0",
        "pages-a/a-b 1.0.0",
        "pages-a/ab 1.0.0",
        "pages-a/ab/c 1.0.0",
        "pages-b/x 1.2.0",
        "pages-b/x 1.9.0",
        "pages-b/x 1.10.0",
        "pages-c/y 0.1.0",
    ];
    let (status, page) = env.get("/v1/templates").await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert_eq!(listed(&page), every, "{page}");
    assert_eq!(page["next_cursor"], Value::Null, "{page}");

    // Pages of two templates (a cursor's name may hold `/`); the last holds all three
    // versions of `pages-b/x`.
    let (_, first) = env.get("/v1/templates?limit=2").await.unwrap();
    assert_eq!(listed(&first), every[..2], "{first}");
    assert_eq!(first["next_cursor"], "pages-a/a-b", "{first}");
    let (_, second) = env
        .get("/v1/templates?limit=2&cursor=pages-a/a-b")
        .await
        .unwrap();
    assert_eq!(listed(&second), every[2..4], "{second}");
    assert_eq!(second["next_cursor"], "pages-a/ab/c", "{second}");
    let (_, last) = env
        .get("/v1/templates?limit=2&cursor=pages-a%2Fab%2Fc")
        .await
        .unwrap();
    assert_eq!(listed(&last), every[4..], "{last}");
    assert_eq!(last["next_cursor"], Value::Null, "{last}");
    // A page of one template with three versions.
    let (_, one) = env
        .get("/v1/templates?limit=1&cursor=pages-a/ab/c")
        .await
        .unwrap();
    assert_eq!(listed(&one), every[4..7], "{one}");
    assert_eq!(one["next_cursor"], "pages-b/x", "{one}");

    // Filters.
    for (query, expected) in [
        ("namespace=pages-b", &every[4..7]),
        ("namespace=pages-b&name=x", &every[4..7]),
        ("name=ab%2Fc", &every[3..4]),
        ("name=ab", &every[2..3]),
        ("namespace=pages-a&limit=1&cursor=pages-a/Zed", &every[1..2]),
        ("namespace=nowhere", &[][..]),
        ("namespace=pages-a%00", &[][..]),
    ] {
        let (status, page) = env.get(&format!("/v1/templates?{query}")).await.unwrap();
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(listed(&page), expected, "{query}: {page}");
    }

    // Every bad parameter named.
    let (status, body) = env
        .get("/v1/templates?limit=0&cursor=no-slash&colour=red")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let paths: Vec<&Value> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["path"])
        .collect();
    assert_eq!(
        paths,
        [&json!("limit"), &json!("cursor"), &json!("colour")],
        "{body}"
    );
    env.finish().await.unwrap();
}
