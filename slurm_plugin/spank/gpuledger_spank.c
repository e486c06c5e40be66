/*
 * gpuledger SPANK plugin: adds --gpu-token=TOKEN|@FILE to sbatch, salloc and
 * srun, resolves the token on the submitting host and hands it to slurmctld's
 * job_submit.lua as GPULEDGER_TOKEN=<token> in job_desc.spank_job_env (the
 * prolog and epilog see it as SPANK_GPULEDGER_TOKEN).
 *
 * Where the token comes from, first match wins:
 *   1. --gpu-token=TOKEN, or --gpu-token=@FILE (also in #SBATCH lines)
 *   2. $GPU_TOKEN (an empty value counts as unset)
 *   3. ~/.config/gpuledger/token, if it exists
 * Token files must be private (no group/other permission bits), like ssh keys.
 * The token text is never logged.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(gpuledger, 1);

#define GL_ENV_NAME "GPULEDGER_TOKEN"   /* spank_job_env name read by job_submit.lua */
#define GL_MAX_TOKEN 4096               /* bytes, after stripping trailing whitespace */
#define GL_MAX_FILE 65536               /* a token file larger than this is refused */
#define GL_DEFAULT_FILE ".config/gpuledger/token"

static char *opt_value; /* raw --gpu-token argument, client side only */

static int opt_cb(int val, const char *optarg, int remote)
{
	(void) val;
	if (remote)
		return 0; /* slurmstepd: the token already travelled with the job */
	free(opt_value);
	opt_value = strdup(optarg ? optarg : "");
	return opt_value ? 0 : -1;
}

static struct spank_option gpu_token_opt = {
	"gpu-token", "TOKEN|@FILE",
	"gpuledger token paying for the job's GPUs (default: $GPU_TOKEN, "
	"then ~/" GL_DEFAULT_FILE ")",
	1, 0, opt_cb
};

static const char *home_dir(const char *user)
{
	struct passwd *pw;
	const char *home;

	if (!user) {
		home = getenv("HOME");
		if (home && *home)
			return home;
		pw = getpwuid(getuid());
	} else {
		pw = getpwnam(user);
	}
	return pw ? pw->pw_dir : NULL;
}

/* "~/x" -> "$HOME/x", "~user/x" -> that user's home; others unchanged. */
static char *expand_path(const char *path)
{
	const char *rest, *home;
	char *user = NULL, *out;
	size_t n;

	if (path[0] != '~')
		return strdup(path);
	rest = strchr(path, '/');
	if (!rest)
		rest = path + strlen(path);
	if (rest > path + 1) {
		user = strndup(path + 1, rest - path - 1);
		if (!user)
			return NULL;
	}
	home = home_dir(user);
	free(user);
	if (!home)
		return strdup(path);
	n = strlen(home) + strlen(rest) + 1;
	out = malloc(n);
	if (out)
		snprintf(out, n, "%s%s", home, rest);
	return out;
}

/* Reads a private token file. Returns a malloc'd buffer or NULL (error logged). */
static char *read_token_file(const char *path)
{
	struct stat st;
	char *buf = NULL;
	ssize_t got;
	size_t len = 0;
	int fd;

	fd = open(path, O_RDONLY | O_NOCTTY | O_CLOEXEC);
	if (fd < 0) {
		slurm_error("gpu-token: cannot open %s: %s", path, strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) < 0) {
		slurm_error("gpu-token: cannot stat %s: %s", path, strerror(errno));
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		slurm_error("gpu-token: %s is not a regular file", path);
		goto fail;
	}
	if (st.st_uid != getuid() && st.st_uid != 0) {
		slurm_error("gpu-token: %s is owned by uid %u, not by you (uid %u)",
			    path, (unsigned) st.st_uid, (unsigned) getuid());
		goto fail;
	}
	if (st.st_mode & 077) {
		const char *who = (st.st_mode & 004) ? "readable by others" :
				  (st.st_mode & 040) ? "readable by group" :
				  "accessible by group or others";
		slurm_error("gpu-token: %s is %s (mode %04o); chmod 600 it",
			    path, who, (unsigned) (st.st_mode & 07777));
		goto fail;
	}
	if (st.st_size > GL_MAX_FILE) {
		slurm_error("gpu-token: %s is too large (%lld bytes) to hold a token",
			    path, (long long) st.st_size);
		goto fail;
	}
	buf = malloc(GL_MAX_FILE + 1);
	if (!buf)
		goto fail;
	while (len < GL_MAX_FILE &&
	       (got = read(fd, buf + len, GL_MAX_FILE - len)) != 0) {
		if (got < 0) {
			if (errno == EINTR)
				continue;
			slurm_error("gpu-token: cannot read %s: %s", path, strerror(errno));
			goto fail;
		}
		len += got;
	}
	buf[len] = '\0';
	close(fd);
	return buf;
fail:
	if (buf) {
		memset(buf, 0, GL_MAX_FILE + 1);
		free(buf);
	}
	close(fd);
	return NULL;
}

static void wipe(char *s)
{
	if (s) {
		memset(s, 0, strlen(s));
		free(s);
	}
}

/* Strips trailing whitespace, checks size and characters. 0 if usable. */
static int check_token(char *tok, const char *from)
{
	size_t len = strlen(tok);
	size_t i;

	while (len > 0 && isspace((unsigned char) tok[len - 1]))
		tok[--len] = '\0';
	if (len == 0) {
		slurm_error("gpu-token: the token from %s is empty", from);
		return -1;
	}
	if (len > GL_MAX_TOKEN) {
		slurm_error("gpu-token: the token from %s is %zu bytes, more than %d",
			    from, len, GL_MAX_TOKEN);
		return -1;
	}
	for (i = 0; i < len; i++) {
		if (iscntrl((unsigned char) tok[i])) {
			slurm_error("gpu-token: the token from %s contains control characters",
				    from);
			return -1;
		}
	}
	return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();

	(void) ac;
	(void) av;
	if (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR && ctx != S_CTX_REMOTE)
		return 0;
	if (spank_option_register(sp, &gpu_token_opt) != ESPANK_SUCCESS) {
		slurm_error("gpu-token: cannot register the --gpu-token option");
		return -1;
	}
	return 0;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();
	char *tok = NULL, *path = NULL, *from = NULL;
	const char *env, *home;
	spank_err_t err;
	int rc = -1;

	(void) ac;
	(void) av;
	if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL)
		return 0;
	/* srun inside an existing allocation creates no job: nothing to pay. */
	if (ctx == S_CTX_LOCAL && getenv("SLURM_JOB_ID"))
		return 0;

	if (opt_value) {
		if (opt_value[0] == '@') {
			path = expand_path(opt_value + 1);
			if (!path)
				goto out;
			if (!*path) {
				slurm_error("gpu-token: --gpu-token=@ needs a file name");
				goto out;
			}
			tok = read_token_file(path);
			from = path;
		} else {
			tok = strdup(opt_value);
			from = "--gpu-token";
		}
	} else if ((env = getenv("GPU_TOKEN")) && *env) {
		tok = strdup(env);
		from = "$GPU_TOKEN";
	} else {
		home = home_dir(NULL);
		if (!home)
			return 0;
		if (asprintf(&path, "%s/%s", home, GL_DEFAULT_FILE) < 0) {
			path = NULL;
			goto out;
		}
		if (access(path, F_OK) != 0) {
			rc = 0; /* no token at all: job_submit.lua decides */
			goto out;
		}
		tok = read_token_file(path);
		from = path;
	}
	if (!tok || check_token(tok, from) != 0)
		goto out;

	err = spank_job_control_setenv(sp, GL_ENV_NAME, tok, 1);
	if (err != ESPANK_SUCCESS) {
		slurm_error("gpu-token: cannot pass the token to the job: %s",
			    spank_strerror(err));
		goto out;
	}
	rc = 0;
out:
	wipe(tok);
	free(path);
	return rc;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void) sp;
	(void) ac;
	(void) av;
	wipe(opt_value);
	opt_value = NULL;
	return 0;
}
