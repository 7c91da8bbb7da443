//! `serve`: builds the server process from its flags and runs it until a signal — the template store,
//! the serving certificate, the listeners, the drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::ServeArgs;
use crate::metrics::Metrics;
use crate::server::{self, AppState, Limits};
use crate::store::dir::DirStore;
use crate::store::{cluster, TemplateStore};
use crate::supervise::{supervise, Fatal, Supervision};
use crate::tls::CertEvent;
use crate::{certs, tls};

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let policy = args.names.policy();
    let metrics = Arc::new(crate::metrics::Metrics::default());
    // A supervised task that gives up ends the process through the drain, with exit code 1.
    let fatal = Fatal::default();
    let store = template_store(&args, &policy.names, &metrics, &fatal).await?;
    let platform_namespace = policy.names.platform_namespace.clone();
    let state = AppState::with_metrics(store, policy, metrics.clone());

    let resolver = serving_certificate(&args, &state, platform_namespace, &fatal).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(resolver));
    let limits = limits(&args);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.admin_listen))?;
    tracing::info!(listen = %listener.local_addr()?, admin = %admin.local_addr()?, "serving");

    let (stop_admin, admin_task) = spawn_admin(admin, state.clone());
    #[cfg(feature = "noop-handler")]
    let app =
        if args.noop_handler { server::noop_router(&limits) } else { server::webhook_router(state.clone(), &limits) };
    #[cfg(not(feature = "noop-handler"))]
    let app = server::webhook_router(state.clone(), &limits);
    let shutdown = shutdown(state.clone(), fatal.clone());
    server::serve_tls(listener, acceptor, app, limits, state.metrics.clone(), shutdown).await;
    let _ = stop_admin.send(true);
    let _ = admin_task.await;
    tracing::info!("stopped");
    match fatal.raised() {
        Some(task) => anyhow::bail!("the {task} task kept stopping (see the log above); drained and stopped"),
        None => Ok(()),
    }
}

/// The templates: a directory read once, or the cluster watched.
async fn template_store(
    args: &ServeArgs,
    names: &crate::names::Names,
    metrics: &Arc<Metrics>,
    fatal: &Fatal,
) -> anyhow::Result<Arc<dyn TemplateStore>> {
    Ok(match &args.templates {
        Some(path) => {
            let store = DirStore::load(path, names)?;
            metrics.templates_reloaded(store.problems.len());
            Arc::new(store)
        }
        None => cluster::ClusterStore::start(names, &args.watch_namespaces, metrics.clone(), fatal.clone()).await?,
    })
}

fn limits(args: &ServeArgs) -> Limits {
    Limits {
        max_body_bytes: args.max_body_bytes,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds),
        drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
        max_concurrent_requests: args.max_concurrent_requests.max(1),
        request_timeout: Duration::from_secs(args.request_timeout_seconds.max(1)),
        keep_alive_timeout: Limits::default().keep_alive_timeout,
    }
}

/// The admin listener (health, readiness, metrics), served until the sender says stop: after the
/// webhook listener has drained, so readiness stays visible throughout.
fn spawn_admin(
    admin: tokio::net::TcpListener,
    state: Arc<AppState>,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let stop = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    let app = server::admin_router(state);
    (stop_tx, tokio::spawn(async move { axum::serve(admin, app).with_graceful_shutdown(stop).await }))
}

/// Resolves when the server should drain: on SIGTERM/SIGINT, or when a supervised task gave up.
/// Readiness turns false first; a second signal exits at once.
async fn shutdown(state: Arc<AppState>, fatal: Fatal) {
    tokio::select! {
        () = shutdown_signal() => {}
        () = fatal.wait() => {}
    }
    state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("shutting down: readiness is now false");
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
}

/// The certificate the TLS listener serves, kept current: files reloaded on change, the builtin
/// Secret-backed pair, or a self-signed one for local use.
async fn serving_certificate(
    args: &ServeArgs,
    state: &AppState,
    platform_namespace: String,
    fatal: &Fatal,
) -> anyhow::Result<Arc<tls::CertResolver>> {
    let metrics = state.metrics.clone();
    let (cert, files) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let (loaded, bytes) = tls::load_files(cert, key)?;
            (loaded, Some((cert.clone(), key.clone(), bytes)))
        }
        _ if args.cert_secret.is_some() => (tls::self_signed()?.0, None),
        _ => {
            let (loaded, _) = tls::self_signed()?;
            tracing::warn!("no --tls-cert/--tls-key: serving a generated SELF-SIGNED certificate for localhost; for local use only");
            (loaded, None)
        }
    };
    metrics.certificate_loaded(cert.not_after);
    let resolver = tls::CertResolver::new(cert.key);
    if let Some(secret) = &args.cert_secret {
        // Until the Secret's pair is served and the caBundle patched, the placeholder
        // self-signed certificate above is not trusted by anyone: stay unready.
        state.certificate_ready.store(false, std::sync::atomic::Ordering::Release);
        let cfg = certs::BuiltinConfig {
            // The Secret lives in the webhook's own namespace (where the chart grants access to it),
            // which need not be the platform namespace.
            namespace: std::env::var("POD_NAMESPACE").ok().filter(|ns| !ns.is_empty()).unwrap_or(platform_namespace),
            secret: secret.clone(),
            dns_names: args.cert_dns_names.clone(),
            webhook_configuration: args.webhook_configuration.clone(),
            validity: Duration::from_secs(args.cert_validity_seconds.max(60)),
            check_every: Duration::from_secs(args.cert_check_seconds.max(1)),
        };
        let client = kube::Client::try_default().await.context("builtin certificates need the Kubernetes API")?;
        let (ready, resolver) = (state.certificate_ready.clone(), resolver.clone());
        let run = move || {
            let events = certificate_events(&metrics);
            certs::BuiltinCerts::new(client.clone(), cfg.clone(), resolver.clone()).run(ready.clone(), events)
        };
        // Readiness returns when a restarted task has served the Secret's pair again.
        spawn_certificate_task(run, state, false, fatal.clone());
    } else if let Some((cert, key, bytes)) = files {
        let every = Duration::from_secs(args.cert_reload_seconds.max(1));
        let resolver = resolver.clone();
        let run = move || {
            let events = certificate_events(&metrics);
            tls::watch_files(cert.clone(), key.clone(), bytes.clone(), resolver.clone(), every, events)
        };
        spawn_certificate_task(run, state, true, fatal.clone());
    }
    Ok(resolver)
}

/// A certificate task's events as metrics.
fn certificate_events(metrics: &Arc<Metrics>) -> impl Fn(CertEvent<'_>) + Send + 'static {
    let metrics = metrics.clone();
    move |event| match event {
        CertEvent::Loaded(c) => metrics.certificate_loaded(c.not_after),
        CertEvent::Failed { source } => metrics.certificate_error(source),
    }
}

/// Supervises the task keeping the serving certificate current: while it is down, readiness is
/// false and `certificate_watch_up` 0; `up_is_ready`: a running task means ready (files), or the
/// task says so itself (builtin, after its first pass).
fn spawn_certificate_task<F, Fut>(run: F, state: &AppState, up_is_ready: bool, fatal: Fatal)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (metrics, ready) = (state.metrics.clone(), state.certificate_ready.clone());
    let on_state = move |running: bool| {
        metrics.certificate_watch(running);
        if !running || up_is_ready {
            ready.store(running, std::sync::atomic::Ordering::Release);
        }
    };
    let give_up = move || {
        tracing::error!(
            "the certificate task keeps stopping; draining, then exiting for the kubelet to restart the process"
        );
        fatal.raise("certificate");
    };
    tokio::spawn(supervise("certificate", run, Supervision::default(), on_state, give_up));
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
