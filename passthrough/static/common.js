/* What the route builder (app.js) and the console (console.js) share: sizes as people
   read them, and the server's rule for a platform in a file name. */
"use strict";

window.passthroughCommon = (function () {
  function humanSize(bytes) {
    if (bytes === null || bytes === undefined) return "—";
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? bytes + " bytes" : value.toFixed(value < 10 ? 2 : 1) + " " + units[unit];
  }

  // containerd's defaults: arm64 is arm64/v8, arm is arm/v7.
  function samePlatform(a, b) {
    const norm = (p) => {
      const [os, arch, variant] = p.toLowerCase().split("/");
      return os + "/" + arch + "/" + (variant || { arm64: "v8", arm: "v7" }[arch] || "");
    };
    return norm(a) === norm(b);
  }

  // The platform in the file name when it is not the server's default, as the server's
  // Content-Disposition has it (reference.platform_filename): two platforms' archives
  // must not overwrite each other on a device's flash.
  function platformFilename(file, platform, defaultPlatform) {
    if (!platform || samePlatform(platform, defaultPlatform)) return file;
    return file.replace(/\.tar$/, "") + "_" + platform.split("/").join("-") + ".tar";
  }

  return { humanSize: humanSize, samePlatform: samePlatform,
           platformFilename: platformFilename };
})();
