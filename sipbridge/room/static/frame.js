// Embeds the room page cross-origin (see frame.html).
"use strict";
(function () {
  const other = location.hostname === "localhost" ? "127.0.0.1" : "localhost";
  document.getElementById("call").src = location.protocol + "//" + other + ":" + location.port + "/" + location.search;
})();
