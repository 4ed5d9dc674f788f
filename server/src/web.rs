//! The dashboard: one page and its assets, compiled into the binary so that a server with no
//! internet access and nothing on disk but its data directory can show it. The page is an
//! ordinary client of `/api/v1`; it holds no secret of its own, so serving it needs no token.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: Asset = Asset { name: "index.html", content_type: "text/html; charset=utf-8", body: include_bytes!("../web/index.html") };

/// Everything under `/ui/`.
const ASSETS: &[Asset] = &[
    Asset { name: "app.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../web/app.js") },
    Asset { name: "app.css", content_type: "text/css; charset=utf-8", body: include_bytes!("../web/app.css") },
    Asset { name: "icon.svg", content_type: "image/svg+xml", body: include_bytes!("../web/icon.svg") },
];

/// Only this page's own scripts, styles and API: an agent that reports a hostname full of markup
/// gets text on the page, and a stray inline script would not run.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /` and `GET /ui/{name}`. Merged into the main router beside the API.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/ui/{name}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => serve(a, &headers),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

/// Entity tags of INDEX followed by ASSETS, computed once: browsers revalidate on every load
/// (`no-cache`), so an upgraded server's page is seen at once and an unchanged one costs a 304.
fn etag(asset: &Asset) -> HeaderValue {
    static TAGS: OnceLock<Vec<(&'static str, HeaderValue)>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        std::iter::once(&INDEX)
            .chain(ASSETS)
            .map(|a| {
                let digest = Sha256::digest(a.body);
                let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
                let value = HeaderValue::from_str(&format!("\"{hex}\"")).unwrap_or(HeaderValue::from_static("\"0\""));
                (a.name, value)
            })
            .collect()
    });
    tags.iter().find(|(n, _)| *n == asset.name).map_or(HeaderValue::from_static("\"0\""), |(_, v)| v.clone())
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let tag = etag(asset);
    let fresh =
        request.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii() == tag.as_bytes()));
    let common = [
        (header::ETAG, tag),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (common, [(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type))], asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str, if_none_match: Option<&HeaderValue>) -> Response {
        let mut req = Request::get(path);
        if let Some(tag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        router::<()>().oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
        for (path, ty) in
            [("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css"), ("/ui/icon.svg", "image/svg")]
        {
            let resp = get(path, None).await;
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            let h = resp.headers();
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ty), "{path}");
            assert!(h[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        assert_eq!(get("/ui/../Cargo.toml", None).await.status(), StatusCode::NOT_FOUND);
        assert_eq!(get("/ui/missing.js", None).await.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn an_unchanged_asset_is_revalidated_with_a_304() {
        let first = get("/ui/app.js", None).await;
        let tag = first.headers()[header::ETAG].clone();
        let again = get("/ui/app.js", Some(&tag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let other = get("/ui/app.css", Some(&tag)).await;
        assert_eq!(other.status(), StatusCode::OK, "each asset has its own tag");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_no_inline_script() {
        let html = std::str::from_utf8(INDEX.body).unwrap();
        assert!(!html.contains("http://") && !html.contains("https://"), "no external resources");
        assert!(!html.contains("<script>") && !html.contains("style="), "inline code would be refused by the policy");
        for a in ASSETS {
            let text = std::str::from_utf8(a.body).unwrap().replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("https://") && !text.contains("http://"), "{} reaches outside the server", a.name);
        }
        let js = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(!js.contains("innerHTML") && !js.contains("insertAdjacentHTML"), "agent-reported text must never be parsed as HTML");
    }
}
